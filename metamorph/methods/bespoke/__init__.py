"""Bespoke (Lee & Moon, AAAI 2023): a student assembled from the teacher with some of its
segments replaced by sub-networks of the teacher itself and of public pretrained networks, each
distilled to mimic its segment, chosen by simulated annealing under a measured latency budget,
then retrained with distillation.

Stages: ``metamorph-train task=bespoke_preprocess`` (the model house, resumable),
``metamorph-customize method=bespoke`` (the search, per budget and device),
``metamorph-train task=bespoke_retrain`` (distillation of the chosen student).
"""
