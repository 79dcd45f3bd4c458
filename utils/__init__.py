"""Building blocks of the method: losses, memory bank, augmentations, schedules, metrics, config."""
