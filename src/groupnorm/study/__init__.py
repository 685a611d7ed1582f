"""The batch-size study (Wu & He 2018, section 4.1, scaled down): BatchNorm's error grows as the
images per device shrink, GroupNorm's does not.

Modules: ``config`` (runs, studies, presets, arm names), ``data`` (the generated default, the
splits and per-seed draws), ``fashion`` (the Fashion-MNIST idx reader, checksums), ``cifar``
(the torchvision-layout reader, MD5 sums, download), ``models`` (the ResNet and its norm arms,
per-device BatchNorm), ``training`` (one run), ``runner`` (plan, parallel runs, resume),
``results`` (the crash-safe JSON-lines file), ``intervals`` (Student's t intervals, paired
differences, TOST), ``protocol`` (the pre-registered claims), ``report`` (tables, claims and
plots), ``distributed`` (torchrun), ``cli`` (``groupnorm study``). Nothing here is imported by
``import groupnorm``.
"""
