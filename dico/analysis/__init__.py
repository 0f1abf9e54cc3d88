"""The paper's analyses as functions (the notebooks in ``notebooks/`` call them and plot):

* :mod:`.attention`: DiT attention probabilities captured with hooks, attention locality (Fig. 4).
* :mod:`.channels`: channel activation scores of the last block's mixer, first-stage features (Figs. 5, 7).
* :mod:`.runs`: a run's metrics CSV as curves, the quickstart trained or loaded, class grids of samples.
* :mod:`.training`: small models trained on the digits with the training stack, noised digits.
* :mod:`.reports`: the ablation runner's result tables read back, the paper's full Tables 3 and 4.
* :mod:`.notebook`: the notebooks' size switch (``DICO_NOTEBOOK_SIZE``) and working folder.

Only :mod:`.runs` (training and loading the quickstart) and :mod:`.training` import Lightning, when called.
"""
