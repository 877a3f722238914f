"""The compile passes, one module each: calibrate → measure → allocate → quantize → export."""
