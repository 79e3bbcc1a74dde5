"""DDPM image generation on diffusers: data (digits or a folder), the training task, sampling
(DDPM, DDIM) and classifier-based sample quality (Fréchet distance, confidence, class entropy)."""
