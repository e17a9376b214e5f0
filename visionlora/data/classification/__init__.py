"""Few-shot image classification data: the data module, the ImageFolder scan, k-shot sampling, presets, dataset.

- ``datamodule``: :class:`FewShotDataModule`, any registered classification source as a LightningDataModule.
- ``imagefolder``: scanning and checking ``root/<class>/<images>`` folders.
- ``sampling``: seeded, stratified k-shot draws and splits, and the selection file.
- ``presets``: the albumentations training and evaluation pipelines and the backbone's preprocessing settings.
- ``dataset``: :class:`FewShotDataset`, images in memory or on disk with a transform.

Nothing is imported here: the named sources (``visionlora.data.sources``) use the scan and the sampler while the
data module uses the sources, so importing the data module from this package would close a circle. The public
names are exported by ``visionlora.data``.
"""
