"""How graftline's stages are run: adapters (DVC via the CLI, TFX) over components.*.run."""
