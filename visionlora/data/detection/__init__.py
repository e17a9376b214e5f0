"""Few-shot object detection data: the COCO reader, the data module, dataset and collate, TFA sampling, presets.

- ``coco``: reading and checking COCO detection json (``load_coco``).
- ``datamodule``: :class:`CocoDetectionDataModule`, any registered detection source as a LightningDataModule.
- ``dataset``: :class:`DetectionDataset` and ``collate_detection``.
- ``sampling``: TFA's K-instance sampler (Wang et al. 2020, arXiv:2003.06957) and its selection file.
- ``presets``: box-aware albumentations pipelines.

Nothing is imported here: the COCO-folder source (``visionlora.data.sources``) uses the reader while the data
module uses the sources, so importing the data module from this package would close a circle. The public names
are exported by ``visionlora.data``.
"""
