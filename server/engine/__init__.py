"""The generation engine: requests in, per-image previews and results out, through events."""
