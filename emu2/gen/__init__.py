"""Visual-generation side of Emu2: Emu2-Gen end to end (`pipeline`), decoder training (`train_decoder`),
metrics (`metrics`) and box-mask images for grounded generation (`boxes`). The diffusion decoder pipelines
themselves live in `emu2.model.decoder` and `emu2.model.video_decoder`."""
