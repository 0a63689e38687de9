"""GPU tests: run where CUDA is, skipped with the reason elsewhere (marker ``gpu``)."""
