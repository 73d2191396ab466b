"""Visual-generation side of Emu2: Emu2-Gen end to end (`pipeline`), decoder training steps (`train_decoder`,
`train_video_decoder`) and their parts (`small_decoders`, `sdxl`, `decoder_shards`), metrics (`metrics`). The
diffusion decoder pipelines themselves live in `emu2.model.decoder` and `emu2.model.video_decoder`; the
``emu2 train`` decoder stages in `emu2.train.stages.decoder`; box-mask images in `emu2.data.boxes`."""
