"""Studies on Ray Tune: search spaces (:mod:`.search_space`), the one trial type (:mod:`.trial`)
and trainable (:mod:`.trainable`), starting Ray and the Tuner (:mod:`.experiment`), experiment
folders and their lock (:mod:`.experiment_folder`), TensorBoard and progress (:mod:`.tune_callbacks`),
and the grid and adaptation studies (:mod:`.grid`, :mod:`.adapt`). Importing the package imports no Ray."""
