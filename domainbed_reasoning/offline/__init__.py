"""Everything that lets the pipeline run with no download: SynthDG, the simulated teacher,
tiny models built from configs, and the demo that strings the stages together."""
