"""The 63 FoMo-in-Flux datasets (spec/fif.md §2.1-2.3): names, roles, sizes and templates.

Class-name lists are not shipped: `classnames()` reads the reference's
`<NAME>_classnames.json` from the user's info folder. Retrieval sets need none.
"""

from __future__ import annotations

import dataclasses
import json
import os


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    key: str  # lower-case key used in configs and logs
    name: str  # folder name and prefix of the info JSONs
    role: str  # "adaptation" or "evaluation" (evaluation-only)
    num_train: int  # from the paper's table; 0 where there is no train split
    num_test: int
    num_classes: int  # size of the class-name list (the zero-shot label space)
    stream_classes: int | None  # classes of this dataset in the shipped 18,381-entry streams
    resized: bool  # the benchmark reads the pre-resized `_224` copy (spec §2.4)
    train_split: str | None  # split name in file names
    test_split: str
    task: str  # "classification" or "retrieval"
    release_period: int | None  # time-incremental bucket (spec §3.4), adaptation sets only
    template: str  # the one prompt template ("primer") of the dataset
    aliases: tuple[str, ...] = ()  # other accepted spellings in stream files

    @property
    def is_retrieval(self) -> bool:
        return self.task == "retrieval"

    def split_name(self, split: str) -> str:
        """Logical split ("train"/"test") -> the split name used in this dataset's file names."""
        if split == "test":
            return self.test_split
        if split == "train":
            if self.train_split is None:
                raise ValueError(f"dataset {self.key!r} has no train split")
            return self.train_split
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")

    def info_filename(self, split: str) -> str:
        """Name of the info JSON the benchmark reads for a logical split (spec §2.4)."""
        suffix = "_224" if self.resized else ""
        return f"{self.name}_{self.split_name(split)}{suffix}.json"

    def prompt(self, classname: str) -> str:
        """The dataset's template filled with a class name (objectnet turns `_` into spaces)."""
        if self.key == "objectnet":
            classname = classname.replace("_", " ")
        return self.template.format(classname)


def _row(
    key,
    name,
    train,
    test,
    classes,
    stream,
    resized,
    train_split,
    test_split,
    kind,
    period,
    template,
):
    return DatasetInfo(
        key=key,
        name=name,
        role="adaptation" if period is not None else "evaluation",
        num_train=train,
        num_test=test,
        num_classes=classes,
        stream_classes=stream,
        resized=resized,
        train_split=train_split,
        test_split=test_split,
        task={"cls": "classification", "ret": "retrieval"}[kind],
        release_period=period,
        template=template,
        aliases=_ALIASES.get(name, ()),
    )


# Second folder spellings accepted in stream files (spec §2.1 notes).
_ALIASES = {"EuroSAT": ("EUROSAT",), "FGVCAircraft": ("FGVCAIRCRAFT",), "Food101": ("FOOD101",)}

# fmt: off
ADAPTATION = (
    # key, NAME, train, test, classes, stream classes, _224, train split, test split, type,
    # release period (time-incremental bucket, spec §3.4), template
    _row('ai2diagrams', 'AI2DIAGRAMS', 2720, 681, 15, 15, True, 'train', 'test', 'cls', 7, 'A photo of a {}.'),
    _row('artbench10', 'ARTBENCH10', 47531, 11883, 1870, 1870, False, 'train', 'test', 'cls', 13, 'A painting of the artist {}.'),
    _row('birdsnap', 'BIRDSNAP', 31905, 7977, 500, 500, True, 'train', 'test', 'cls', 5, 'A photo of the bird {}.'),
    _row('cifar100', 'CIFAR100', 50000, 10000, 100, 100, False, 'train', 'test', 'cls', 1, 'A photo of a {}.'),
    _row('clevr', 'CLEVR', 55931, 13983, 247, 217, True, 'train', 'test', 'cls', 8, 'A photo of synthetic shapes, with {}.'),
    _row('clrs', 'CLRS', 13525, 1475, 25, 25, False, 'train', 'test', 'cls', 11, 'A satellite image of a {}.'),
    _row('country211', 'COUNTRY211', 31650, 21100, 211, 211, True, 'train', 'test', 'cls', 12, 'A photo representing the country of {}.'),
    _row('cub200', 'CUB200', 5994, 5794, 200, 200, False, 'train', 'test', 'cls', 3, 'A photo of a {}, a type of bird.'),
    _row('df20mini', 'DF20MINI', 32724, 3637, 179, 179, True, 'train', 'test', 'cls', 12, 'A photo of the fungi {}.'),
    _row('dollarstreet', 'DOLLARSTREET', 13555, 4103, 1701, 1701, True, 'train', 'test', 'cls', 13, 'A photo of a {}.'),
    _row('domainnet_clipart', 'DOMAINNET_CLIPART', 33525, 14604, 345, 345, True, 'train', 'test', 'cls', 10, 'A clipart of a {}.'),
    _row('domainnet_infograph', 'DOMAINNET_INFOGRAPH', 36023, 15582, 345, 345, True, 'train', 'test', 'cls', 10, 'An infograph of a {}.'),
    _row('domainnet_painting', 'DOMAINNET_PAINTING', 50416, 21850, 344, 344, True, 'train', 'test', 'cls', 10, 'A painting of a {}.'),
    _row('domainnet_sketch', 'DOMAINNET_SKETCH', 48212, 20916, 345, 345, True, 'train', 'test', 'cls', 10, 'A sketch of a {}.'),
    _row('dsprites', 'DSPRITES', 75000, 25000, 27, 27, False, 'train', 'test', 'cls', 8, 'A black-and-white photo of a {}.'),
    _row('dtd', 'DTD', 1880, 1880, 47, 47, False, 'train', 'test', 'cls', 5, 'A photo of a {} texture.'),
    _row('fgvcaircraft', 'FGVCAircraft', 3334, 3333, 100, 100, True, 'train', 'test', 'cls', 4, 'A photo of a {}, a type of aircraft.'),
    _row('flowers102', 'FLOWERS102', 6149, 1020, 102, 102, False, 'train', 'test', 'cls', 0, 'A photo of a {}, a type of flower.'),
    _row('fru92', 'FRU92', 55814, 9200, 92, 92, True, 'train', 'test', 'cls', 8, 'A photo of a {}, a type of fruit.'),
    _row('inaturalist2021', 'iNATURALIST2021', 125000, 25000, 2500, 2500, True, 'train_mini', 'val', 'cls', 12, 'A photo of a {}.'),
    _row('isicmelanoma', 'ISICMELANOMA', 2245, 562, 7, 7, True, 'train', 'test', 'cls', 11, 'A close-up photo of human skin with a mole exhibiting {}.'),
    _row('mitstates', 'MITSTATES', 43002, 10751, 1962, 1959, False, 'train', 'test', 'cls', 6, 'A photo of a {}.'),
    _row('mtsd', 'MTSD', 59978, 8737, 227, 227, False, 'train', 'val', 'cls', 11, 'A centered photo of a "{}" traffic sign.'),
    _row('mvtecad_adapt', 'MVTECAD_Adapt', 2903, 726, 15, 15, True, 'train', 'test', 'cls', 10, 'A close-up photo of a {}.'),
    _row('mvtecad_eval', 'MVTECAD_Eval', 1380, 345, 88, 88, True, 'train', 'test', 'cls', 10, 'A close-up photo of a {}.'),
    _row('objectnet', 'OBJECTNET', 40134, 10000, 313, 313, True, 'train', 'test', 'cls', 10, 'A photo of a {}.'),
    _row('obsc_animals', 'OBSC_ANIMALS', 17000, 4238, 74, 74, False, 'train', 'test', 'cls', 14, 'A photo of the obscure animal {}.'),
    _row('obsc_things', 'OBSC_THINGS', 19128, 4758, 84, 84, False, 'train', 'test', 'cls', 14, 'A photo of the obscure thing {}.'),
    _row('openimages', 'OPENIMAGES', 115333, 8593, 589, 579, True, 'train', 'test', 'cls', 7, 'A photo of a {}.'),
    _row('patternnet', 'PATTERNNET', 26600, 3800, 38, 38, False, 'train', 'test', 'cls', 9, 'A satellite image of a {}.'),
    _row('places365', 'PLACES365', 120231, 36499, 365, 365, False, 'train', 'test', 'cls', 8, 'A photo of a {}.'),
    _row('plantvillage', 'PLANTVILLAGE', 43444, 10681, 38, 38, False, 'train', 'test', 'cls', 6, 'A close-up photo of a {}.'),
    _row('quilt', 'QUILT', 95862, 23966, 157, 156, True, 'train', 'test', 'cls', 14, 'A histopathology photo depicting {} pathologies.'),
    _row('resisc45', 'RESISC45', 18900, 6300, 45, 45, False, 'train', 'test', 'cls', 12, 'A satellite image of {}.'),
    _row('shapes3d', 'SHAPES3D', 75000, 25000, 864, 864, False, 'train', 'test', 'cls', 9, 'A photo of a synthetic {}.'),
    _row('snake_clef', 'SNAKECLEF', 151031, 14117, 1599, 1599, True, 'train', 'test', 'cls', 13, 'A photo of a {} snake.'),
    _row('sun397', 'SUN397', 15880, 19850, 397, 397, True, 'train', 'test', 'cls', 2, 'A photo of a {}.'),
    _row('synthclip106', 'SynthCLIP106', 84800, 13886, 106, 106, False, 'train', 'test', 'cls', 14, 'A photo of a {}.'),
    _row('veg200', 'VEG200', 61117, 20000, 200, 200, True, 'train', 'test', 'cls', 8, 'A photo of a {}, a type of vegetable.'),
    _row('zappos50k', 'ZAPPOS50k', 37829, 9458, 1847, 1847, False, 'train', 'test', 'cls', 5, 'A photo of {} shoes.'),
    _row('fscoco', 'FSCOCO', 7105, 1777, 115, 115, False, 'train', 'test', 'ret', 13, 'A sketch of a {}'),
)
EVALUATION = (
    _row('caltech101', 'CALTECH101', 6026, 2651, 101, None, True, 'train', 'test', 'cls', None, 'A photo of a {}.'),
    _row('caltech256', 'CALTECH256', 21307, 9300, 257, None, True, 'train', 'test', 'cls', None, 'A photo of a {}.'),
    _row('cars196', 'CARS196', 8144, 8041, 196, None, True, 'train', 'test', 'cls', None, 'A photo of a {}, a type of car.'),
    _row('cifar10', 'CIFAR10', 50000, 10000, 10, None, False, 'train', 'test', 'cls', None, 'A photo of a {}.'),
    _row('domainnet_quickdraw', 'DOMAINNET_QUICKDRAW', 60375, 25875, 345, None, True, 'train', 'test', 'cls', None, 'A quickdraw of a {}.'),
    _row('eurosat', 'EuroSAT', 18900, 8100, 10, None, False, 'train', 'test', 'cls', None, 'A centered satellite photo of a {}.'),
    _row('fashionmnist', 'FashionMNIST', 60000, 10000, 10, None, False, 'train', 'test', 'cls', None, 'A black-and-white photo of a {}, a type of clothing.'),
    _row('food101', 'Food101', 75750, 25250, 101, None, True, 'train', 'test', 'cls', None, 'A photo of a {}, a type of food.'),
    _row('gtsrb', 'GTSRB', 18635, 8005, 43, None, False, 'train', 'test', 'cls', None, 'A centered photo of a "{}" traffic sign.'),
    _row('imagenet', 'IMAGENET', 0, 50000, 1000, None, True, None, 'test', 'cls', None, 'A photo of a {}.'),
    _row('imagenet_a', 'IMAGENET_A', 0, 7500, 200, None, True, None, 'test', 'cls', None, 'A photo of a {}.'),
    _row('imagenet_d', 'IMAGENET_D', 0, 4835, 103, None, True, None, 'test', 'cls', None, 'A photo of a {}.'),
    _row('imagenet_r', 'IMAGENET_R', 0, 30000, 200, None, True, None, 'test', 'cls', None, 'A photo of a {}.'),
    _row('imagenet_s', 'IMAGENET_S', 0, 50889, 1000, None, True, None, 'test', 'cls', None, 'A photo of a {}.'),
    _row('imagenet_v2', 'IMAGENET_V2', 0, 10000, 1000, None, True, None, 'test', 'cls', None, 'A photo of a {}.'),
    _row('mnist', 'MNIST', 60000, 10000, 10, None, False, 'train', 'test', 'cls', None, 'A black-and-white photo of the number: "{}".'),
    _row('monkeys10', 'MONKEYS10', 1097, 272, 10, None, True, 'train', 'test', 'cls', None, 'A photo of a {}, a type of monkey.'),
    _row('oxford_pets', 'OXFORDPETS', 3680, 3669, 37, None, False, 'train', 'test', 'cls', None, 'A photo of a {}, a type of pet.'),
    _row('stl10', 'STL10', 5000, 8000, 10, None, False, 'train', 'test', 'cls', None, 'A photo of a {}.'),
    _row('svhn', 'SVHN', 73257, 26032, 10, None, False, 'train', 'test', 'cls', None, 'A photo of the number: "{}".'),
    _row('mscoco', 'MSCOCO', 0, 5000, 0, None, True, None, 'test', 'ret', None, '{}'),
    _row('flickr30k', 'FLICKR30K', 0, 1000, 0, None, False, None, 'test', 'ret', None, '{}'),
)
# fmt: on

DATASETS: dict[str, DatasetInfo] = {d.key: d for d in ADAPTATION + EVALUATION}
ADAPTATION_KEYS = tuple(d.key for d in ADAPTATION)
EVALUATION_KEYS = tuple(d.key for d in EVALUATION)


def _spellings(datasets: dict[str, DatasetInfo]) -> dict[str, DatasetInfo]:
    """Every accepted spelling -> its dataset; lower-cased spellings as the fallback."""
    table: dict[str, DatasetInfo] = {}
    for d in datasets.values():
        for spelling in (d.key, d.name, *d.aliases):
            table[spelling] = d
    for spelling, d in list(table.items()):
        table.setdefault(spelling.lower(), d)
    return table


_LOOKUP = _spellings(DATASETS)


def get(dataset: str, registry: dict[str, DatasetInfo] | None = None) -> DatasetInfo:
    """A dataset by key or any accepted folder spelling (case-insensitive fallback), from the
    63 benchmark datasets or from `registry` (e.g. fif_synth's)."""
    table = _LOOKUP if registry is None else _spellings(registry)
    found = table.get(dataset) or table.get(dataset.lower())
    if found is None:
        known = sorted(DATASETS if registry is None else registry)
        raise KeyError(f"unknown dataset {dataset!r}; known keys: {known}")
    return found


def classnames_path(info: DatasetInfo, info_dir: str) -> str:
    """`<info_dir>/<NAME>_classnames.json`, trying every accepted spelling of NAME."""
    for spelling in (info.name, *info.aliases):
        path = os.path.join(info_dir, f"{spelling}_classnames.json")
        if os.path.exists(path):
            return path
    return os.path.join(info_dir, f"{info.name}_classnames.json")


def classnames(dataset: str | DatasetInfo, info_dir: str) -> list[str]:
    """The class-name list of a dataset (index = target), read from the user's info folder."""
    info = dataset if isinstance(dataset, DatasetInfo) else get(dataset)
    path = classnames_path(info, info_dir)
    if not os.path.exists(path):
        raise FileNotFoundError(f"class-name list of {info.key!r} not found: {path}")
    with open(path) as f:
        try:
            names = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{path}: expected a JSON list of class-name strings")
    return names


def save_datasets(datasets: dict[str, DatasetInfo], path: str) -> None:
    """Write a registry (e.g. a synthetic benchmark's) as JSON, one object per dataset."""
    with open(path, "w") as f:
        json.dump([dataclasses.asdict(d) for d in datasets.values()], f, indent=1)


def load_datasets(path: str) -> dict[str, DatasetInfo]:
    """Read a registry written by `save_datasets`; errors name the file and the entry."""
    with open(path) as f:
        try:
            rows = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    fields = {f.name for f in dataclasses.fields(DatasetInfo)}
    datasets = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or set(row) - fields or "key" not in row:
            raise ValueError(f"{path}: entry {i} is not a dataset description: {row!r}")
        try:
            info = DatasetInfo(**dict(row, aliases=tuple(row.get("aliases", ()))))
        except TypeError as e:
            raise ValueError(f"{path}: entry {i} ({row.get('key')!r}): {e}") from None
        datasets[info.key] = info
    return datasets
