"""FER2013 class names and label indices: the one place the package defines them."""

CLASS_NAMES: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
NUM_CLASSES = len(CLASS_NAMES)
CLASS_INDEX: dict[str, int] = {name: i for i, name in enumerate(CLASS_NAMES)}
IMAGE_SIZE = 48


def class_index(folder_name: str) -> int | None:
    """Label index for a class folder name (any case), or None when it is not a FER2013 class."""
    return CLASS_INDEX.get(folder_name.strip().lower())
