"""Context sources: built-in superclass maps against their published tables, k-means, domains."""

import pytest
import timm
import torch
import transformers
from sklearn.datasets import load_digits

from ctxnorm_hf.contexts import BackboneFeatures, ContextSource, DomainContexts, KMeansContexts, SuperclassContexts

# https://www.cs.toronto.edu/~kriz/cifar.html: superclass -> its five classes
CIFAR100_PUBLISHED = {
    "aquatic_mammals": ["beaver", "dolphin", "otter", "seal", "whale"],
    "fish": ["aquarium_fish", "flatfish", "ray", "shark", "trout"],
    "flowers": ["orchid", "poppy", "rose", "sunflower", "tulip"],
    "food_containers": ["bottle", "bowl", "can", "cup", "plate"],
    "fruit_and_vegetables": ["apple", "mushroom", "orange", "pear", "sweet_pepper"],
    "household_electrical_devices": ["clock", "keyboard", "lamp", "telephone", "television"],
    "household_furniture": ["bed", "chair", "couch", "table", "wardrobe"],
    "insects": ["bee", "beetle", "butterfly", "caterpillar", "cockroach"],
    "large_carnivores": ["bear", "leopard", "lion", "tiger", "wolf"],
    "large_man-made_outdoor_things": ["bridge", "castle", "house", "road", "skyscraper"],
    "large_natural_outdoor_scenes": ["cloud", "forest", "mountain", "plain", "sea"],
    "large_omnivores_and_herbivores": ["camel", "cattle", "chimpanzee", "elephant", "kangaroo"],
    "medium_mammals": ["fox", "porcupine", "possum", "raccoon", "skunk"],
    "non-insect_invertebrates": ["crab", "lobster", "snail", "spider", "worm"],
    "people": ["baby", "boy", "girl", "man", "woman"],
    "reptiles": ["crocodile", "dinosaur", "lizard", "snake", "turtle"],
    "small_mammals": ["hamster", "mouse", "rabbit", "shrew", "squirrel"],
    "trees": ["maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"],
    "vehicles_1": ["bicycle", "bus", "motorcycle", "pickup_truck", "train"],
    "vehicles_2": ["lawn_mower", "rocket", "streetcar", "tank", "tractor"],
}
# The data set's label ids are the positions in its sorted name lists (fine_label_names / coarse_label_names).
CIFAR100_FINE_NAMES = sorted(name for names in CIFAR100_PUBLISHED.values() for name in names)
CIFAR100_COARSE_NAMES = sorted(CIFAR100_PUBLISHED)

# https://www.robots.ox.ac.uk/~vgg/data/pets/: the 12 cat breeds; the other 25 are dogs
PETS_CATS = {
    "Abyssinian", "Bengal", "Birman", "Bombay", "British_Shorthair", "Egyptian_Mau", "Maine_Coon",
    "Persian", "Ragdoll", "Russian_Blue", "Siamese", "Sphynx",
}
PETS_DOGS = {
    "american_bulldog", "american_pit_bull_terrier", "basset_hound", "beagle", "boxer", "chihuahua",
    "english_cocker_spaniel", "english_setter", "german_shorthaired", "great_pyrenees", "havanese",
    "japanese_chin", "keeshond", "leonberger", "miniature_pinscher", "newfoundland", "pomeranian", "pug",
    "saint_bernard", "samoyed", "scottish_terrier", "shiba_inu", "staffordshire_bull_terrier",
    "wheaten_terrier", "yorkshire_terrier",
}
# Class ids of the data set (list.txt) follow the case-insensitive alphabetical order of the breeds.
PETS_BREEDS = sorted(PETS_CATS | PETS_DOGS, key=str.lower)

# https://github.com/zalandoresearch/fashion-mnist#labels
FASHION_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_GROUPS = {"tops": {"T-shirt/top", "Pullover", "Coat", "Shirt"}, "footwear": {"Sandal", "Sneaker", "Ankle boot"}, "other": {"Trouser", "Dress", "Bag"}}


def test_cifar100_superclasses_follow_the_published_table():
    source = SuperclassContexts.cifar100()
    assert source.num_contexts == 20
    groups = source.groups_of(torch.arange(100))
    for coarse, fine_names in CIFAR100_PUBLISHED.items():
        for fine in fine_names:
            assert groups[CIFAR100_FINE_NAMES.index(fine)] == CIFAR100_COARSE_NAMES.index(coarse), (fine, coarse)
    assert source.group_names == CIFAR100_COARSE_NAMES


def test_oxford_pets_species():
    source = SuperclassContexts.oxford_pets()
    groups = source.groups_of(torch.arange(37))
    for label, breed in enumerate(PETS_BREEDS):
        assert source.group_names[groups[label]] == ("cat" if breed in PETS_CATS else "dog"), breed
    assert int((groups == 0).sum()) == 12


def test_fashion_mnist_groups():
    source = SuperclassContexts.fashion_mnist()
    groups = source.groups_of(torch.arange(10))
    for label, name in enumerate(FASHION_LABELS):
        assert name in FASHION_GROUPS[source.group_names[groups[label]]]


@pytest.mark.parametrize("factory", [SuperclassContexts.cifar100, SuperclassContexts.oxford_pets, SuperclassContexts.fashion_mnist])
def test_priors_are_the_group_frequencies_of_the_fitted_labels(factory, tmp_path):
    source = factory()
    num_labels = max(source.mapping) + 1
    labels = torch.randint(0, num_labels, (5000,))
    source.fit(labels)
    expected = torch.bincount(source.groups_of(labels), minlength=source.num_contexts).float() / 5000
    torch.testing.assert_close(source.priors, expected)
    torch.testing.assert_close(source.priors.sum(), torch.tensor(1.0))
    source.save(tmp_path)
    loaded = ContextSource.load(tmp_path)
    assert type(loaded) is SuperclassContexts and loaded.name == source.name
    assert torch.equal(loaded.assign(labels), source.assign(labels))
    torch.testing.assert_close(loaded.priors, source.priors)


# --- k-means --------------------------------------------------------------------------------------


def _digit_images() -> torch.Tensor:
    return torch.tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 16.0


def test_kmeans_on_pixels_is_deterministic_and_round_trips(tmp_path):
    images = _digit_images()
    first = KMeansContexts(6, seed=3).fit(images[:1200])
    second = KMeansContexts(6, seed=3).fit(images[:1200])
    assert torch.equal(first.centroids, second.centroids)
    test_ids = first.assign(images[1200:])
    assert test_ids.min() >= 0 and test_ids.max() < 6 and len(set(test_ids.tolist())) == 6
    # nearest centroid, from the input alone
    distances = torch.cdist(images[1200:].flatten(1), first.centroids)
    assert torch.equal(test_ids, distances.argmin(1))
    counts = torch.bincount(first.assign(images[:1200]), minlength=6).float()
    torch.testing.assert_close(first.priors, counts / counts.sum())
    first.save(tmp_path)
    assert torch.equal(ContextSource.load(tmp_path).assign(images[1200:]), test_ids)


def test_kmeans_uses_minibatch_for_large_data():
    blobs = torch.randint(0, 3, (12_000,))
    data = torch.randn(12_000, 5) + blobs.unsqueeze(1) * 6.0
    source = KMeansContexts(3, seed=0).fit(data)
    assert source.algorithm == "MiniBatchKMeans"
    ids = source.assign(data)
    for cluster in range(3):  # every cluster is one blob
        members = blobs[ids == cluster]
        assert torch.bincount(members, minlength=3).max() > 0.99 * len(members)


@pytest.mark.parametrize("library", ["timm", "transformers"])
def test_kmeans_on_frozen_backbone_embeddings_round_trips(library, tmp_path):
    torch.manual_seed(0)
    if library == "timm":
        backbone = timm.create_model("resnet18", pretrained=False, in_chans=1, num_classes=0)
    else:
        config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
        backbone = transformers.ViTModel(config)
    images = _digit_images()[:300]
    features = BackboneFeatures(backbone, batch_size=64, model_args={"in_chans": 1} if library == "timm" else None)
    assert features(images[:5]).shape[0] == 5
    source = KMeansContexts(4, features, seed=0).fit(images[:200])
    ids = source.assign(images[200:])
    source.save(tmp_path)
    loaded = ContextSource.load(tmp_path)
    assert isinstance(loaded.features, BackboneFeatures) and loaded.features.library == library
    assert torch.equal(loaded.assign(images[200:]), ids)


# --- domains --------------------------------------------------------------------------------------


def test_domain_contexts(tmp_path):
    source = DomainContexts(["mnist", "svhn"]).fit({"mnist": 600, "svhn": 200})
    torch.testing.assert_close(source.priors, torch.tensor([0.75, 0.25]))
    assert source.assign("svhn", 3).tolist() == [1, 1, 1]
    assert source.assign(["svhn", "mnist", 0]).tolist() == [1, 0, 0]
    assert not source.label_derived
    source.save(tmp_path)
    assert ContextSource.load(tmp_path).assign("svhn", 2).tolist() == [1, 1]
    with pytest.raises(ValueError, match="Unknown domain 'usps'"):
        source.assign("usps")


def test_backbone_saved_without_its_create_model_arguments_is_explained(tmp_path):
    backbone = timm.create_model("resnet18", pretrained=False, in_chans=1, num_classes=0)
    KMeansContexts(2, BackboneFeatures(backbone), seed=0).fit(_digit_images()[:20]).save(tmp_path)
    with pytest.raises(ValueError, match=r"model_args=\{\.\.\.\}"):
        ContextSource.load(tmp_path)
