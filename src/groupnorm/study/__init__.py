"""The batch-size study (Wu & He 2018, section 4.1, scaled down): BatchNorm's error grows as the
images per device shrink, GroupNorm's does not.

Modules: ``data`` (the generated default and the CIFAR loader), ``cifar`` (the torchvision-layout
reader, MD5 sums, download), ``models`` (the ResNet and its norm arms, per-device BatchNorm),
``training`` (one run), ``runner`` (plan, parallel runs, resume), ``results`` (the crash-safe
JSON-lines file), ``ci`` (Student's t intervals), ``report`` (tables and plots), ``distributed``
(torchrun), ``cli`` (``groupnorm study``). Nothing here is imported by ``import groupnorm``.
"""
