"""Files shipped with adclr: sample images for the demo, held-out Fashion-MNIST scenes, the embedded demo weights."""
