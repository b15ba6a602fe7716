"""Models and their pieces: families of variants, making variants, cuts aligned across
variants, partitions, the content-addressed block store, and stitched configs. Offline
work on ONNX files; it runs models only through the reference engine or a backend."""
