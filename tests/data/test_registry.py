"""The 63-dataset registry (spec/fif.md §2.1-2.3), checked against tables transcribed from the
spec by hand and against the reference class-name lists where they are available."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from fomo_jax.data import registry
from tests.conftest import SHARED

CLASSNAMES = os.path.join(SHARED, "classnames")


def _need_shared():
    if not os.path.isdir(CLASSNAMES):
        pytest.skip(f"reference data not found at {SHARED}")


# Spec §2.1, one tuple per row: key, NAME, #train, #test, #cls, stream, label space, 224,
# splits, type.
# fmt: off
ADAPTATION_TABLE = (
    ('ai2diagrams', 'AI2DIAGRAMS', 2720, 681, 15, 15, 15, True, 'train/test', 'cls'),
    ('artbench10', 'ARTBENCH10', 47531, 11883, 1870, 1870, 1870, False, 'train/test', 'cls'),
    ('birdsnap', 'BIRDSNAP', 31905, 7977, 500, 500, 500, True, 'train/test', 'cls'),
    ('cifar100', 'CIFAR100', 50000, 10000, 100, 100, 100, False, 'train/test', 'cls'),
    ('clevr', 'CLEVR', 55931, 13983, 217, 217, 247, True, 'train/test', 'cls'),
    ('clrs', 'CLRS', 13525, 1475, 25, 25, 25, False, 'train/test', 'cls'),
    ('country211', 'COUNTRY211', 31650, 21100, 211, 211, 211, True, 'train/test', 'cls'),
    ('cub200', 'CUB200', 5994, 5794, 200, 200, 200, False, 'train/test', 'cls'),
    ('df20mini', 'DF20MINI', 32724, 3637, 179, 179, 179, True, 'train/test', 'cls'),
    ('dollarstreet', 'DOLLARSTREET', 13555, 4103, 1701, 1701, 1701, True, 'train/test', 'cls'),
    ('domainnet_clipart', 'DOMAINNET_CLIPART', 33525, 14604, 345, 345, 345, True, 'train/test', 'cls'),  # noqa: E501
    ('domainnet_infograph', 'DOMAINNET_INFOGRAPH', 36023, 15582, 345, 345, 345, True, 'train/test', 'cls'),  # noqa: E501
    ('domainnet_painting', 'DOMAINNET_PAINTING', 50416, 21850, 344, 344, 344, True, 'train/test', 'cls'),  # noqa: E501
    ('domainnet_sketch', 'DOMAINNET_SKETCH', 48212, 20916, 345, 345, 345, True, 'train/test', 'cls'),  # noqa: E501
    ('dsprites', 'DSPRITES', 75000, 25000, 27, 27, 27, False, 'train/test', 'cls'),
    ('dtd', 'DTD', 1880, 1880, 47, 47, 47, False, 'train/test', 'cls'),
    ('fgvcaircraft', 'FGVCAircraft', 3334, 3333, 100, 100, 100, True, 'train/test', 'cls'),
    ('flowers102', 'FLOWERS102', 6149, 1020, 102, 102, 102, False, 'train/test', 'cls'),
    ('fru92', 'FRU92', 55814, 9200, 92, 92, 92, True, 'train/test', 'cls'),
    ('inaturalist2021', 'iNATURALIST2021', 125000, 25000, 2500, 2500, 2500, True, 'train_mini/val', 'cls'),  # noqa: E501
    ('isicmelanoma', 'ISICMELANOMA', 2245, 562, 7, 7, 7, True, 'train/test', 'cls'),
    ('mitstates', 'MITSTATES', 43002, 10751, 1959, 1959, 1962, False, 'train/test', 'cls'),
    ('mtsd', 'MTSD', 59978, 8737, 227, 227, 227, False, 'train/val', 'cls'),
    ('mvtecad_adapt', 'MVTECAD_Adapt', 2903, 726, 15, 15, 15, True, 'train/test', 'cls'),
    ('mvtecad_eval', 'MVTECAD_Eval', 1380, 345, 88, 88, 88, True, 'train/test', 'cls'),
    ('objectnet', 'OBJECTNET', 40134, 10000, 313, 313, 313, True, 'train/test', 'cls'),
    ('obsc_animals', 'OBSC_ANIMALS', 17000, 4238, 74, 74, 74, False, 'train/test', 'cls'),
    ('obsc_things', 'OBSC_THINGS', 19128, 4758, 84, 84, 84, False, 'train/test', 'cls'),
    ('openimages', 'OPENIMAGES', 115333, 8593, 589, 579, 589, True, 'train/test', 'cls'),
    ('patternnet', 'PATTERNNET', 26600, 3800, 38, 38, 38, False, 'train/test', 'cls'),
    ('places365', 'PLACES365', 120231, 36499, 365, 365, 365, False, 'train/test', 'cls'),
    ('plantvillage', 'PLANTVILLAGE', 43444, 10681, 38, 38, 38, False, 'train/test', 'cls'),
    ('quilt', 'QUILT', 95862, 23966, 157, 156, 157, True, 'train/test', 'cls'),
    ('resisc45', 'RESISC45', 18900, 6300, 45, 45, 45, False, 'train/test', 'cls'),
    ('shapes3d', 'SHAPES3D', 75000, 25000, 864, 864, 864, False, 'train/test', 'cls'),
    ('snake_clef', 'SNAKECLEF', 151031, 14117, 1599, 1599, 1599, True, 'train/test', 'cls'),
    ('sun397', 'SUN397', 15880, 19850, 397, 397, 397, True, 'train/test', 'cls'),
    ('synthclip106', 'SynthCLIP106', 84800, 13886, 106, 106, 106, False, 'train/test', 'cls'),
    ('veg200', 'VEG200', 61117, 20000, 200, 200, 200, True, 'train/test', 'cls'),
    ('zappos50k', 'ZAPPOS50k', 37829, 9458, 1847, 1847, 1847, False, 'train/test', 'cls'),
    ('fscoco', 'FSCOCO', 7105, 1777, 115, 115, 115, False, 'train/test', 'ret'),
)
# Spec §2.2: key, NAME, #train (unused), #test, #cls = label space ("–" -> 0), 224, type.
EVALUATION_TABLE = (
    ('caltech101', 'CALTECH101', 6026, 2651, 101, True, 'cls'),
    ('caltech256', 'CALTECH256', 21307, 9300, 257, True, 'cls'),
    ('cars196', 'CARS196', 8144, 8041, 196, True, 'cls'),
    ('cifar10', 'CIFAR10', 50000, 10000, 10, False, 'cls'),
    ('domainnet_quickdraw', 'DOMAINNET_QUICKDRAW', 60375, 25875, 345, True, 'cls'),
    ('eurosat', 'EuroSAT', 18900, 8100, 10, False, 'cls'),
    ('fashionmnist', 'FashionMNIST', 60000, 10000, 10, False, 'cls'),
    ('food101', 'Food101', 75750, 25250, 101, True, 'cls'),
    ('gtsrb', 'GTSRB', 18635, 8005, 43, False, 'cls'),
    ('imagenet', 'IMAGENET', 0, 50000, 1000, True, 'cls'),
    ('imagenet_a', 'IMAGENET_A', 0, 7500, 200, True, 'cls'),
    ('imagenet_d', 'IMAGENET_D', 0, 4835, 103, True, 'cls'),
    ('imagenet_r', 'IMAGENET_R', 0, 30000, 200, True, 'cls'),
    ('imagenet_s', 'IMAGENET_S', 0, 50889, 1000, True, 'cls'),
    ('imagenet_v2', 'IMAGENET_V2', 0, 10000, 1000, True, 'cls'),
    ('mnist', 'MNIST', 60000, 10000, 10, False, 'cls'),
    ('monkeys10', 'MONKEYS10', 1097, 272, 10, True, 'cls'),
    ('oxford_pets', 'OXFORDPETS', 3680, 3669, 37, False, 'cls'),
    ('stl10', 'STL10', 5000, 8000, 10, False, 'cls'),
    ('svhn', 'SVHN', 73257, 26032, 10, False, 'cls'),
    ('mscoco', 'MSCOCO', 0, 5000, 0, True, 'ret'),
    ('flickr30k', 'FLICKR30K', 0, 1000, 0, False, 'ret'),
)
# Spec §2.3, character for character.
TEMPLATES = {
    'ai2diagrams': 'A photo of a {}.',
    'artbench10': 'A painting of the artist {}.',
    'birdsnap': 'A photo of the bird {}.',
    'caltech101': 'A photo of a {}.',
    'caltech256': 'A photo of a {}.',
    'cars196': 'A photo of a {}, a type of car.',
    'cifar10': 'A photo of a {}.',
    'cifar100': 'A photo of a {}.',
    'clevr': 'A photo of synthetic shapes, with {}.',
    'clrs': 'A satellite image of a {}.',
    'country211': 'A photo representing the country of {}.',
    'cub200': 'A photo of a {}, a type of bird.',
    'df20mini': 'A photo of the fungi {}.',
    'dollarstreet': 'A photo of a {}.',
    'domainnet_clipart': 'A clipart of a {}.',
    'domainnet_infograph': 'An infograph of a {}.',
    'domainnet_painting': 'A painting of a {}.',
    'domainnet_quickdraw': 'A quickdraw of a {}.',
    'domainnet_sketch': 'A sketch of a {}.',
    'dsprites': 'A black-and-white photo of a {}.',
    'dtd': 'A photo of a {} texture.',
    'eurosat': 'A centered satellite photo of a {}.',
    'fashionmnist': 'A black-and-white photo of a {}, a type of clothing.',
    'fgvcaircraft': 'A photo of a {}, a type of aircraft.',
    'flickr30k': '{}',
    'flowers102': 'A photo of a {}, a type of flower.',
    'food101': 'A photo of a {}, a type of food.',
    'fru92': 'A photo of a {}, a type of fruit.',
    'fscoco': 'A sketch of a {}',
    'gtsrb': 'A centered photo of a "{}" traffic sign.',
    'imagenet': 'A photo of a {}.',
    'imagenet_a': 'A photo of a {}.',
    'imagenet_d': 'A photo of a {}.',
    'imagenet_r': 'A photo of a {}.',
    'imagenet_s': 'A photo of a {}.',
    'imagenet_v2': 'A photo of a {}.',
    'inaturalist2021': 'A photo of a {}.',
    'isicmelanoma': 'A close-up photo of human skin with a mole exhibiting {}.',
    'mitstates': 'A photo of a {}.',
    'mnist': 'A black-and-white photo of the number: "{}".',
    'monkeys10': 'A photo of a {}, a type of monkey.',
    'mscoco': '{}',
    'mtsd': 'A centered photo of a "{}" traffic sign.',
    'mvtecad_adapt': 'A close-up photo of a {}.',
    'mvtecad_eval': 'A close-up photo of a {}.',
    'objectnet': 'A photo of a {}.',
    'obsc_animals': 'A photo of the obscure animal {}.',
    'obsc_things': 'A photo of the obscure thing {}.',
    'openimages': 'A photo of a {}.',
    'oxford_pets': 'A photo of a {}, a type of pet.',
    'patternnet': 'A satellite image of a {}.',
    'places365': 'A photo of a {}.',
    'plantvillage': 'A close-up photo of a {}.',
    'quilt': 'A histopathology photo depicting {} pathologies.',
    'resisc45': 'A satellite image of {}.',
    'shapes3d': 'A photo of a synthetic {}.',
    'snake_clef': 'A photo of a {} snake.',
    'stl10': 'A photo of a {}.',
    'sun397': 'A photo of a {}.',
    'svhn': 'A photo of the number: "{}".',
    'synthclip106': 'A photo of a {}.',
    'veg200': 'A photo of a {}, a type of vegetable.',
    'zappos50k': 'A photo of {} shoes.',
}
# fmt: on


# --- the dataset list --------------------------------------------------------------------------


def test_63_datasets_41_adaptation_22_evaluation():
    assert len(registry.DATASETS) == 63
    assert len(registry.ADAPTATION) == 41 and len(registry.ADAPTATION_KEYS) == 41
    assert len(registry.EVALUATION) == 22 and len(registry.EVALUATION_KEYS) == 22
    assert not set(registry.ADAPTATION_KEYS) & set(registry.EVALUATION_KEYS)
    assert set(registry.ADAPTATION_KEYS) | set(registry.EVALUATION_KEYS) == set(registry.DATASETS)
    assert {d.role for d in registry.ADAPTATION} == {"adaptation"}
    assert {d.role for d in registry.EVALUATION} == {"evaluation"}
    assert [d.key for d in registry.ADAPTATION] == [row[0] for row in ADAPTATION_TABLE]
    assert [d.key for d in registry.EVALUATION] == [row[0] for row in EVALUATION_TABLE]
    assert all(registry.DATASETS[d.key] is d for d in registry.ADAPTATION + registry.EVALUATION)


def test_adaptation_totals_match_spec_note():
    # Spec §2.1 note: row sums 1,759,790 train / 453,062 test / 18,392 classes (#cls column).
    assert sum(d.num_train for d in registry.ADAPTATION) == 1_759_790
    assert sum(d.num_test for d in registry.ADAPTATION) == 453_062
    # num_classes is the label-space column: #cls + 30 (CLEVR 247 vs 217) + 3 (MIT-States).
    assert sum(d.num_classes for d in registry.ADAPTATION) == 18_392 + 30 + 3


def test_evaluation_totals_match_spec():
    # Spec §2.2: 314,419 test images, 4,653 classes.
    assert sum(d.num_test for d in registry.EVALUATION) == 314_419
    assert sum(d.num_classes for d in registry.EVALUATION) == 4_653


def test_stream_classes_sum_to_18381():
    assert sum(d.stream_classes for d in registry.ADAPTATION) == 18_381
    assert all(d.stream_classes is None for d in registry.EVALUATION)
    assert registry.get("openimages").stream_classes == 579
    assert registry.get("quilt").stream_classes == 156


@pytest.mark.parametrize("row", ADAPTATION_TABLE, ids=lambda r: r[0])
def test_adaptation_row_matches_spec(row):
    key, name, train, test, _cls, stream, space, resized, splits, kind = row
    d = registry.get(key)
    assert (d.key, d.name, d.num_train, d.num_test) == (key, name, train, test)
    assert (d.stream_classes, d.num_classes, d.resized) == (stream, space, resized)
    assert f"{d.train_split}/{d.test_split}" == splits
    assert d.task == {"cls": "classification", "ret": "retrieval"}[kind]
    assert d.release_period is not None


@pytest.mark.parametrize("row", EVALUATION_TABLE, ids=lambda r: r[0])
def test_evaluation_row_matches_spec(row):
    key, name, train, test, classes, resized, kind = row
    d = registry.get(key)
    assert (d.key, d.name, d.num_train, d.num_test) == (key, name, train, test)
    assert (d.num_classes, d.resized, d.test_split) == (classes, resized, "test")
    assert (d.train_split is None) == (train == 0)
    assert d.task == {"cls": "classification", "ret": "retrieval"}[kind]
    assert d.release_period is None


def test_retrieval_sets_are_fscoco_mscoco_flickr30k():
    assert {d.key for d in registry.DATASETS.values() if d.is_retrieval} == {
        "fscoco",
        "mscoco",
        "flickr30k",
    }
    assert registry.get("fscoco").role == "adaptation"


# --- templates ---------------------------------------------------------------------------------


def test_every_template_has_exactly_one_placeholder():
    for d in registry.DATASETS.values():
        assert d.template.count("{}") == 1, d.key
        assert d.template.count("{") == 1 and d.template.count("}") == 1, d.key
        assert d.template.format("X").count("X") == 1, d.key


def test_every_template_matches_spec():
    assert set(TEMPLATES) == set(registry.DATASETS)
    wrong = {k: d.template for k, d in registry.DATASETS.items() if d.template != TEMPLATES[k]}
    assert not wrong


@pytest.mark.parametrize(
    "key, classname, text",
    [
        # embedded double quotes
        ("gtsrb", "stop", 'A centered photo of a "stop" traffic sign.'),
        ("mtsd", "yield", 'A centered photo of a "yield" traffic sign.'),
        ("mnist", "7", 'A black-and-white photo of the number: "7".'),
        # no article
        ("resisc45", "airport", "A satellite image of airport."),
        ("zappos50k", "red boots", "A photo of red boots shoes."),
        # no final period
        ("fscoco", "cat", "A sketch of a cat"),
        # objectnet alone turns underscores into spaces; the rest keep the name verbatim
        ("objectnet", "alarm_clock", "A photo of a alarm clock."),
        ("objectnet", "t_shirt_x", "A photo of a t shirt x."),
        ("imagenet_d", "alarm_clock", "A photo of a alarm_clock."),
        ("cifar100", "Apple_Pie", "A photo of a Apple_Pie."),
        ("flickr30k", "  verbatim caption ", "  verbatim caption "),
    ],
)
def test_prompt_character_for_character(key, classname, text):
    assert registry.get(key).prompt(classname) == text


# --- lookup ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spelling, key",
    [
        ("places365", "places365"),
        ("PLACES365", "places365"),
        ("iNATURALIST2021", "inaturalist2021"),
        ("inaturalist2021", "inaturalist2021"),
        ("INATURALIST2021", "inaturalist2021"),
        ("ZAPPOS50k", "zappos50k"),
        ("SynthCLIP106", "synthclip106"),
        ("MVTECAD_Adapt", "mvtecad_adapt"),
        ("MVTECAD_ADAPT", "mvtecad_adapt"),
        ("MVTECAD_Eval", "mvtecad_eval"),
        ("EuroSAT", "eurosat"),
        ("EUROSAT", "eurosat"),
        ("eurosat", "eurosat"),
        ("FGVCAircraft", "fgvcaircraft"),
        ("FGVCAIRCRAFT", "fgvcaircraft"),
        ("Food101", "food101"),
        ("FOOD101", "food101"),
        ("OXFORDPETS", "oxford_pets"),
        ("oxfordpets", "oxford_pets"),
        ("OxfordPets", "oxford_pets"),
        ("oxford_pets", "oxford_pets"),
        ("OXFORD_PETS", "oxford_pets"),
        ("SNAKECLEF", "snake_clef"),
        ("snakeclef", "snake_clef"),
        ("IMAGENET_V2", "imagenet_v2"),
        ("FLICKR30K", "flickr30k"),
        ("FSCOCO", "fscoco"),
    ],
)
def test_get_accepts_every_spelling(spelling, key):
    assert registry.get(spelling).key == key


def test_every_key_name_and_alias_resolves_to_itself():
    for d in registry.DATASETS.values():
        for spelling in (d.key, d.name, *d.aliases, d.key.upper(), d.name.lower()):
            assert registry.get(spelling) is d, spelling
    assert set(registry.get("eurosat").aliases) == {"EUROSAT"}
    assert set(registry.get("fgvcaircraft").aliases) == {"FGVCAIRCRAFT"}
    assert set(registry.get("food101").aliases) == {"FOOD101"}


@pytest.mark.parametrize("bad", ["imagenet_x", "CIFAR-100", "", "medmnist_derma", "retinopathy"])
def test_get_unknown_raises_key_error_naming_it(bad):
    with pytest.raises(KeyError) as e:
        registry.get(bad)
    assert repr(bad) in str(e.value)


def test_get_with_custom_registry():
    mine = {"toy": dataclasses.replace(registry.get("cifar10"), key="toy", name="TOY")}
    assert registry.get("TOY", mine).key == "toy"
    assert registry.get("Toy", mine).key == "toy"
    with pytest.raises(KeyError, match="cifar10"):
        registry.get("cifar10", mine)


# --- info file names ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dataset, split, filename",
    [
        ("monkeys10", "train", "MONKEYS10_train_224.json"),
        ("MONKEYS10", "test", "MONKEYS10_test_224.json"),
        ("ai2diagrams", "train", "AI2DIAGRAMS_train_224.json"),
        ("cifar100", "train", "CIFAR100_train.json"),
        ("cifar100", "test", "CIFAR100_test.json"),
        ("fgvcaircraft", "test", "FGVCAircraft_test_224.json"),
        ("FGVCAIRCRAFT", "test", "FGVCAircraft_test_224.json"),
        ("eurosat", "test", "EuroSAT_test.json"),
        ("mvtecad_adapt", "test", "MVTECAD_Adapt_test_224.json"),
        ("inaturalist2021", "train", "iNATURALIST2021_train_mini_224.json"),
        ("inaturalist2021", "test", "iNATURALIST2021_val_224.json"),
        ("mtsd", "train", "MTSD_train.json"),
        ("mtsd", "test", "MTSD_val.json"),
        ("imagenet", "test", "IMAGENET_test_224.json"),
        ("mscoco", "test", "MSCOCO_test_224.json"),
        ("flickr30k", "test", "FLICKR30K_test.json"),
        ("isicmelanoma", "test", "ISICMELANOMA_test_224.json"),
        ("fscoco", "train", "FSCOCO_train.json"),
    ],
)
def test_info_filename(dataset, split, filename):
    assert registry.get(dataset).info_filename(split) == filename


@pytest.mark.parametrize("key", ["imagenet", "imagenet_a", "imagenet_v2", "mscoco", "flickr30k"])
def test_test_only_datasets_have_no_train_split(key):
    with pytest.raises(ValueError, match=key):
        registry.get(key).info_filename("train")


@pytest.mark.parametrize("split", ["val", "validation", "train_mini", "TEST", ""])
def test_unknown_logical_split_is_an_error(split):
    with pytest.raises(ValueError, match="split"):
        registry.get("inaturalist2021").info_filename(split)


# --- class-name lists --------------------------------------------------------------------------


def test_label_space_matches_reference_classname_files():
    _need_shared()
    mismatches, missing = [], []
    for d in registry.DATASETS.values():
        if d.key in ("mscoco", "flickr30k"):
            continue  # retrieval, no class list
        path = registry.classnames_path(d, CLASSNAMES)
        if not os.path.exists(path):
            missing.append(d.key)
            continue
        n = len(registry.classnames(d, CLASSNAMES))
        if n != d.num_classes:
            mismatches.append((d.key, d.num_classes, n))
    assert not missing, f"no class-name file for {missing}"
    assert not mismatches, f"(key, registry num_classes, entries in file): {mismatches}"


def test_classnames_files_hold_distinct_strings_per_index():
    _need_shared()
    for key in ("clevr", "mitstates", "openimages", "quilt", "monkeys10", "fscoco"):
        names = registry.classnames(key, CLASSNAMES)
        assert all(isinstance(n, str) and n for n in names), key


@pytest.mark.parametrize(
    "key, first",
    [
        ("clevr", "eight cubes, one cylinder, one sphere"),
        ("CLEVR", "eight cubes, one cylinder, one sphere"),
        ("dsprites", "square located in the top left"),
        ("gtsrb", "red and white circle 20 kph speed limit"),
        ("shapes3d", "red cube on a red floor with a red wall"),
        ("dollarstreet", "all-terrain bike from Brazil"),
        ("imagenet_d", "alarm_clock"),
    ],
)
def test_spec_example_first_class_names(key, first):
    _need_shared()
    assert registry.classnames(key, CLASSNAMES)[0] == first


def test_inaturalist_uses_full_taxonomic_path():
    _need_shared()
    assert registry.classnames("iNATURALIST2021", CLASSNAMES)[0].startswith(
        "Animalia Annelida Clitellata Haplotaxida"
    )


def test_imagenet_v2_is_imagenet_sorted_case_insensitively():
    _need_shared()
    imagenet = registry.classnames("imagenet", CLASSNAMES)
    assert registry.classnames("imagenet_v2", CLASSNAMES) == sorted(imagenet, key=str.lower)


def test_classnames_reads_alternative_folder_spelling(tmp_path):
    (tmp_path / "EUROSAT_classnames.json").write_text(json.dumps(["a", "b"]))
    assert registry.classnames_path(registry.get("eurosat"), str(tmp_path)).endswith(
        "EUROSAT_classnames.json"
    )
    assert registry.classnames("EuroSAT", str(tmp_path)) == ["a", "b"]
    # The primary spelling wins when both exist.
    (tmp_path / "EuroSAT_classnames.json").write_text(json.dumps(["c"]))
    assert registry.classnames("eurosat", str(tmp_path)) == ["c"]


def test_classnames_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        registry.classnames("monkeys10", str(tmp_path))
    assert str(tmp_path / "MONKEYS10_classnames.json") in str(e.value)


def test_classnames_invalid_json_names_file(tmp_path):
    path = tmp_path / "MONKEYS10_classnames.json"
    path.write_text('["a", "b",')
    with pytest.raises(ValueError) as e:
        registry.classnames("monkeys10", str(tmp_path))
    assert str(path) in str(e.value)


@pytest.mark.parametrize("content", [{"0": "a"}, ["a", 1], ["a", None], "abc", 3, [["a"]], None])
def test_classnames_not_a_list_of_strings_names_file(tmp_path, content):
    path = tmp_path / "MONKEYS10_classnames.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError) as e:
        registry.classnames("monkeys10", str(tmp_path))
    assert str(path) in str(e.value)


# --- saving and loading a registry -------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    path = str(tmp_path / "datasets.json")
    registry.save_datasets(registry.DATASETS, path)
    loaded = registry.load_datasets(path)
    assert list(loaded) == list(registry.DATASETS)
    assert loaded == registry.DATASETS
    assert loaded["eurosat"].aliases == ("EUROSAT",)
    assert isinstance(loaded["eurosat"].aliases, tuple)
    # A loaded registry works for lookups like the built-in one.
    assert registry.get("FOOD101", loaded).key == "food101"
    assert loaded["mtsd"].info_filename("test") == "MTSD_val.json"


def test_save_load_custom_subset(tmp_path):
    toy = dataclasses.replace(
        registry.get("cifar10"), key="toy", name="TOY", num_classes=3, template="A toy {}."
    )
    path = str(tmp_path / "toy.json")
    registry.save_datasets({"toy": toy}, path)
    assert registry.load_datasets(path) == {"toy": toy}


def test_load_datasets_invalid_json_names_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("[{")
    with pytest.raises(ValueError) as e:
        registry.load_datasets(str(path))
    assert str(path) in str(e.value)


def _row_dicts():
    return [dataclasses.asdict(registry.get(k)) for k in ("cifar10", "mnist")]


@pytest.mark.parametrize(
    "breakage",
    [
        lambda row: row.update(unknown_field=1),
        lambda row: row.pop("template"),
        lambda row: row.pop("key"),
    ],
    ids=["unknown-field", "missing-template", "missing-key"],
)
def test_load_datasets_malformed_entry_names_file_and_entry(tmp_path, breakage):
    rows = _row_dicts()
    breakage(rows[1])
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(ValueError) as e:
        registry.load_datasets(str(path))
    assert str(path) in str(e.value)
    assert "entry 1" in str(e.value)


def test_load_datasets_non_object_entry_names_file_and_entry(tmp_path):
    rows = _row_dicts()
    rows.append("cifar100")
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(ValueError) as e:
        registry.load_datasets(str(path))
    assert str(path) in str(e.value) and "entry 2" in str(e.value)
