"""Category similarity (seed 001, SWRM); docs/swrm.md.

Modules (imported on use, so `longtail --help` stays light):

- `projection`: class prototypes, their 1-D t-SNE projection;
- `windows`: class order, similarity windows, sim(i, c), SWR weights (Eq. 2), SWM margins (Eq. 3);
- `confusion`: the confusable head-to-tail table of test predictions (Table 1);
- `plot`: SWR vs class-balanced weights per class (Fig. 2);
- `command`: `longtail similarity RUN_DIR`.
"""
