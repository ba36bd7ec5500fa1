"""``make demo``: the main job on the embedded MNIST default, end to end.

Trains the default classifier (or resumes / reuses ``checkpoints/embedded_mnist_sn_resnet/last.ckpt``) and
evaluates it on the test split.
"""

from __future__ import annotations

from pathlib import Path

from cfx.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
CLASSIFIER_CONFIG = REPO / "configs" / "classifier" / "embedded_mnist_sn_resnet.yaml"


def main() -> None:
    """Train (or reuse) the default classifier and test it."""
    config = str(CLASSIFIER_CONFIG)
    print(f"[cfx demo] training the default SN-ResNet on the embedded MNIST digits ({CLASSIFIER_CONFIG.name})")
    cli_main(["fit", "-c", config, "--ckpt_path=last"])
    print("[cfx demo] evaluating it on the 1,000 held-out test digits")
    cli_main(["test", "-c", config, "--ckpt_path=last"])


if __name__ == "__main__":
    main()
