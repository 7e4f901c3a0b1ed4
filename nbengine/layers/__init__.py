"""Building blocks shared by the model files: linear, norm, rotary, paged attention."""
