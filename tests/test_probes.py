"""Probes on frozen features against plain references: k-NN, linear probe, dense probe and its scores."""
from __future__ import annotations

import math

import pytest
import torch

from adclr.probes import confusion_matrix, dense_probe, knn_accuracy, linear_probe, segmentation_scores



def clusters(n_per_class: int, num_classes: int, dim: int, spread: float, seed: int):
    """Gaussian clusters around fixed random centres of norm 5: (features, labels); ``seed`` draws the samples."""
    centres = torch.nn.functional.normalize(torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(99)),
                                            dim=1) * 5
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=g), labels



# ---------------------------------------------------------------- k-NN


def knn_reference(train, train_labels, test, test_labels, k, temperature, num_classes):
    """DINO's weighted k-NN written as plain loops over test rows."""
    correct = 0
    for x, y in zip(test.tolist(), test_labels.tolist()):
        sims = []
        for t, label in zip(train.tolist(), train_labels.tolist()):
            cos = sum(a * b for a, b in zip(x, t)) / math.sqrt(sum(a * a for a in x) * sum(b * b for b in t))
            sims.append((cos, label))
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * num_classes
        for cos, label in sims[:k]:
            votes[label] += math.exp(cos / temperature)
        correct += votes.index(max(votes)) == y
    return 100.0 * correct / len(test)


def test_knn_matches_a_brute_force_reference():
    g = torch.Generator().manual_seed(1)
    train, test = torch.randn(60, 6, generator=g), torch.randn(25, 6, generator=g)
    train_labels, test_labels = torch.randint(0, 4, (60,), generator=g), torch.randint(0, 4, (25,), generator=g)
    for k, temperature in ((1, 0.07), (7, 0.07), (20, 0.5)):
        expected = knn_reference(train, train_labels, test, test_labels, k, temperature, 4)
        got = knn_accuracy(train, train_labels, test, test_labels, k=k, temperature=temperature, chunk_size=4)
        assert got == pytest.approx(expected)
    assert 0 < expected < 100  # random data: the comparison is not vacuous


def test_knn_separable_clusters_and_errors():
    train, train_labels = clusters(30, 5, 16, spread=0.3, seed=0)
    test, test_labels = clusters(10, 5, 16, spread=0.3, seed=1)
    assert knn_accuracy(train, train_labels, test, test_labels, k=10) == 100.0
    with pytest.raises(ValueError, match="lower k"):
        knn_accuracy(train, train_labels, test, test_labels, k=1000)
    with pytest.raises(ValueError, match="num_classes"):
        knn_accuracy(train, train_labels, test, test_labels, num_classes=3)
    with pytest.raises(ValueError, match="one label per row"):
        knn_accuracy(train, train_labels[:-1], test, test_labels)


# ---------------------------------------------------------------- linear probe


def test_linear_probe_separable_and_random_labels():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 4, generator=g)

    def separable(n):
        """Labels from a fixed linear map, keeping points with a margin; offset and scaled (the probe standardises)."""
        x = torch.randn(10 * n, 32, generator=g)
        top2 = (x @ w).topk(2, dim=1).values
        x = x[top2[:, 0] - top2[:, 1] > 3.0][:n]
        return x * 3 + 7, (x @ w).argmax(1)

    (train, train_labels), (test, test_labels) = separable(800), separable(400)
    assert linear_probe(train, train_labels, test, test_labels, epochs=30, lr=1e-2) > 95
    assert linear_probe(train, train_labels, test, test_labels, epochs=30, lr=0.1, optimizer="sgd") > 95
    random_train, random_test = torch.randint(0, 4, (800,), generator=g), torch.randint(0, 4, (400,), generator=g)
    assert 10 < linear_probe(train, random_train, test, random_test, epochs=10) < 40
    with pytest.raises(ValueError, match="'adamw' or 'sgd'"):
        linear_probe(train, train_labels, test, test_labels, epochs=1, optimizer="lbfgs")


# ---------------------------------------------------------------- dense probe


def test_segmentation_scores_match_a_hand_computed_confusion_matrix():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 255]])
    prediction = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 3]])
    confusion = confusion_matrix(prediction, target, num_classes=4)
    # rows ground truth, columns prediction; the 255 pixel is ignored; class 3 appears nowhere
    assert confusion.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 2, 0], [0, 0, 0, 0]]
    scores = segmentation_scores(confusion)
    # IoU: class 0 = 1 / (2 + 2 - 1), class 1 = 2 / (2 + 3 - 2), class 2 = 2 / (3 + 2 - 2); class 3 left out
    assert scores["miou"] == pytest.approx(100 * (1 / 3 + 2 / 3 + 2 / 3) / 3)
    assert scores["pixel_acc"] == pytest.approx(100 * 5 / 7)
    # foreground = classes 1-3 merged: 5 pixels in the truth, 5 predicted, 4 both
    # (one class-2 pixel called 0, one 0 called 1)
    assert scores["fg_iou"] == pytest.approx(100 * 4 / (5 + 5 - 4))
    # a class predicted but absent from the ground truth counts with IoU 0
    # (GT class 0: 1 pixel right, 1 predicted as class 1 -> IoU 1/2 and 0/1)
    assert segmentation_scores(torch.tensor([[1, 1], [0, 0]]))["miou"] == pytest.approx(25.0)


def one_hot_maps(n: int, num_classes: int, seed: int):
    """Patch maps whose first channels one-hot encode a random class map (plus noise channels); masks 4x larger."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.randint(0, num_classes, (n, 6, 6), generator=g)
    maps = torch.cat([torch.nn.functional.one_hot(classes, num_classes).permute(0, 3, 1, 2).float(),
                      torch.randn(n, 4, 6, 6, generator=g)], dim=1)
    masks = classes.repeat_interleave(4, dim=1).repeat_interleave(4, dim=2)
    return maps, masks


def test_dense_probe_learns_a_class_channel():
    train_maps, train_masks = one_hot_maps(48, 4, seed=0)
    test_maps, test_masks = one_hot_maps(16, 4, seed=1)
    scores = dense_probe(train_maps, train_masks, test_maps, test_masks, num_classes=4, epochs=30, lr=5e-2)
    assert scores["miou"] > 90 and scores["pixel_acc"] > 95
    shuffled = dense_probe(train_maps, train_masks[torch.randperm(48)], test_maps, test_masks, epochs=5)
    assert shuffled["miou"] < 60
    with pytest.raises(ValueError, match="3-d"):
        dense_probe(train_maps, train_masks[:, 0], test_maps, test_masks)
