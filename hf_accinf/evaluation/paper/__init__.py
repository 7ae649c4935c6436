"""The paper harness: the ACC-SGD-IE paper's evaluation reproduced on its own data and models (Tables 1-4,
the long-epoch curves, data cleansing), behind ``scripts/reproduce_paper.py`` and
``scripts/reproduce_section7.py``. Nothing in the product imports it."""
