"""Visual-generation side of Emu2: Emu2-Gen end to end (`pipeline`), decoder training (the step, `train_decoder`;
the `emu2 train` stages, `decoder_stage`, over `small_decoders`, `sdxl` and `decoder_shards`), metrics (`metrics`)
and box-mask images for grounded generation (`boxes`). The diffusion decoder pipelines themselves live in
`emu2.model.decoder` and `emu2.model.video_decoder`."""
