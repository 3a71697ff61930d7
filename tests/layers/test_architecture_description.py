"""A network as data: every network of the catalogue survives describe -> JSON -> build unchanged, and a description
that names anything but mnet's layers and their fields is refused."""

import json

import pytest

import mnet
from mnet.layers.architecture import LAYER_CLASSES, build_network, describe_network
from tests.cases import BLOCK_NETWORKS, LAYERS, USER_NETWORKS

BUILT_IN = [
    mnet.models.digits_cnn(),
    mnet.models.transformer_classifier(16, 16),
    mnet.models.gpt(32, 16, 32, 2, 4, num_kv_heads=2, rope_base=500.0, tie_embeddings=True, block_size=4),
    mnet.mlp([16, 10], compute_dtype="bfloat16"),
    mnet.serial(mnet.Dense(3, W_init="he_normal"), mnet.LeakyRelu(0.3), mnet.Dropout(0.2), mnet.BatchNorm()),
]


CATALOGUE = [entry[0] for entry in list(BLOCK_NETWORKS.values()) + LAYERS]  # (network, example shape) pairs


@pytest.mark.parametrize("net", BUILT_IN + CATALOGUE, ids=repr)
def test_every_network_round_trips_through_json(net):
    try:
        description = describe_network(net)
    except mnet.KindError:
        pytest.skip("holds a test's own layer class")
    assert build_network(json.loads(json.dumps(description))) == net


def test_a_users_layer_has_no_description_and_a_description_names_only_mnets_layers():
    user = next(iter(USER_NETWORKS.values()))
    with pytest.raises(mnet.KindError, match="which is not one of mnet's layers"):
        describe_network(mnet.serial(mnet.Dense(2), user))
    cases = [
        ({"layer": "os.system"}, "names 'os.system', which is not one of mnet's layers"),
        ({"layer": "Dense", "out_dim": 3, "__class__": "x"}, r"network \(Dense\) has no field __class__"),
        ({"layer": "Serial", "layers": [{"layer": "Dense"}]}, r"network.layers\[0\] \(Dense\)"),
        ({"layer": "Serial", "layers": [{"out_dim": 3}]}, r"network.layers\[0\] is \{'out_dim': 3\}, not a layer"),
        ("Dense", "is 'Dense', not a layer description"),
    ]
    for description, message in cases:
        with pytest.raises(mnet.SettingError, match=message):
            build_network(description)
    assert "Policy" in LAYER_CLASSES and "Serial" in LAYER_CLASSES
