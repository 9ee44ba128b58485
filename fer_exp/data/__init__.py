"""The data layer: FER2013 from its CSV or Kaggle folders, or synthetic faces, as uint8 tensors."""

from fer_exp.data.dataset import SPLIT_NAMES, DataError, DecodeReport, FerData, Split
from fer_exp.data.loader import detect_format, load_data
from fer_exp.data.synthetic import synthetic_split

__all__ = ["SPLIT_NAMES", "DataError", "DecodeReport", "FerData", "Split", "detect_format", "load_data", "synthetic_split"]
