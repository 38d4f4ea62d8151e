"""On-device scoring: model bundles, the TFLite runtime, detector, calibration, replay."""
