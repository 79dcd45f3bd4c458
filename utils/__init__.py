"""The method's building blocks: losses, contrastive loss, memory bank, selectors, ClassMix and augmentations, class
balancing, EMA teacher, schedules, metrics, the steps of one iteration (ssl_steps.py) and what differs between the
scripts (variants.py) and between the fidelity presets (fidelity.py). errors.py is shared by every package.

(translate_labels.py and curves.py are thin entry points of documented commands, not part of the method.)
"""
