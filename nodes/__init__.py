"""ComfyUI glue for fera_core: nodes, model folder, sampling-time routing. Imports ComfyUI."""
