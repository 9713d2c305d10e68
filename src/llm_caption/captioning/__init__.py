"""Image captioning: data, encoders, decoders, training, decoding and serving."""
