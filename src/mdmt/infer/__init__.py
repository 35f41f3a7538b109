"""Use a trained model: load a finished run, predict on new films, explain with Grad-CAM, export.

``model_io`` loads a run folder, ``preprocess`` turns files into the network input exactly as training
did, ``predict`` writes predictions, ``cam`` and ``overlays`` compute and draw Grad-CAM, ``explain``
writes the overlays, ``export`` writes ONNX or TorchScript with the preprocessing beside it.
"""
