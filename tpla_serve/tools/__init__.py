"""Tools built on the engine: calibration of TPLA transforms, teacher-forced evaluation."""
