"""Patch SVDD (Yi & Yoon, ACCV 2020): patch-level SVDD for anomaly detection and segmentation."""
