//! Loss and gradients of the tiny model against PyTorch (see tests/golden/README.md).
