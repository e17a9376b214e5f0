"""Named datasets: embedded digits, Omniglot, synthetic detection scenes, torchvision's FGVC sets."""
