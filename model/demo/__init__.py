"""The embedded demo model: a tiny NextStep trained here on pictures of coloured shapes.

`scenes` draws and captions the pictures, `edits` turns one scene into another by an instruction,
`dataset` samples reproducible training and held-out examples, `checker` reads a picture back into
attributes, `train` fits the VAE and the model, `evaluate` measures how often pictures match prompts.
The trained checkpoint lives in `nextstep-demo/` in the published layout (WEIGHTS_DIR); the
directory's name is the model id the server reports.
"""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "nextstep-demo"
