"""The maths of one decoder layer at a time, for models that do not fit in memory: the layer-pass
worker (worker.py) and its compensation pass (compensate.py), one layer seen as a model so the
registered criteria run on it (layer_view.py), weights read lazily and the pruned checkpoint written
layer by layer (lazy_weights.py, write.py). cluster/ drives the passes; nothing here does."""
