"""Column layouts of the raw formats we read and write (Criteo Kaggle / 1TB, Avazu).

Everything here is a constant: names in file order, and the Kaggle per-field numbers of distinct
values that the generator scales.
"""

from __future__ import annotations

__all__ = [
    "CRITEO_CARDINALITIES",
    "CRITEO_CATEGORICAL",
    "CRITEO_DENSE",
    "CRITEO_KAGGLE_ROWS",
    "AVAZU_COLUMNS",
    "AVAZU_CATEGORICAL",
    "LABEL",
    "FORMAT_VERSION",
    "DENSE_TRANSFORM",
]

#: Version of the dataset directory layout written by this package (bump on incompatible change).
FORMAT_VERSION = 1

#: Name of the label column in every dataset we write.
LABEL = "label"

#: Criteo integer (dense) features, in file order after the label.
CRITEO_DENSE = [f"I{i}" for i in range(1, 14)]
#: Criteo categorical features, in file order after the dense ones.
CRITEO_CATEGORICAL = [f"C{i}" for i in range(1, 27)]

#: Distinct values per categorical field in the Criteo Kaggle ``train.txt`` (C1..C26).
CRITEO_CARDINALITIES = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)

#: Rows of the Criteo Kaggle ``train.txt``; a generator preset of scale ``s`` defaults to ``s`` times this.
CRITEO_KAGGLE_ROWS = 45_840_617

#: Avazu ``train`` header, in file order.
AVAZU_COLUMNS = [
    "id", "click", "hour", "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id",
    "app_domain", "app_category", "device_id", "device_ip", "device_model", "device_type",
    "device_conn_type", "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21",
]
#: Categorical features of a converted Avazu dataset: ``hour`` (YYMMDDHH) becomes hour-of-day and
#: weekday, the 21 other fields are kept as they are (``id`` is dropped).
AVAZU_CATEGORICAL = ["hour_of_day", "weekday"] + AVAZU_COLUMNS[3:]

#: The dense transform applied to Criteo integer features (both protocols), recorded in the metadata.
DENSE_TRANSFORM = {
    "name": "log1p_clamp0",
    "version": 1,
    "formula": "missing -> 0; x < 0 -> 0; x -> log(x + 1); stored as float32",
}
