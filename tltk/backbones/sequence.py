"""Sequence backbones: a recurrent net reads an image one row per time step.

The MNIST report's RNN, LSTM and GRU: a 28x28 digit is 28 time steps of 28 pixels, and
the top layer's hidden state after the last row is the feature vector a head reads. A
colour row is its W pixels' R, G, B values in turn (W x 3 values); ``greyscale=true``
averages the channels first, which for tltk's RGB copies of grey images gives back the
original W values per row, as in the report.

The per-row states of the top layer are also shaped as a map, (N, hidden, rows, 1), so
the uniform backbone interface holds: ``forward_spatial`` is that map (a ``conv`` head
convolves along the rows), ``forward_vector`` its last row. Plain RNNs are known to
explode; train them with ``--clip-grad``.

The wrapped net's modules are ``rows`` (image to sequence), ``rnn`` (the torch
recurrent layer, its parameters under torch's own names), ``states`` (the per-row map)
and ``last`` (the feature vector); they have no conv or fc layers, so the literature's
layer words (conv1, pool5, fc7) name nothing here.
"""

from __future__ import annotations

import torch
from torch import nn

from tltk.backbones.base import HALF_MEAN, HALF_STD, Backbone, Preprocessing
from tltk.plugin import backbone_factory
from tltk.backbones.small import check_choice, check_flag, check_positive_int, no_pretrained
from tltk.errors import TltkError

NONLINEARITIES = ("tanh", "relu")


class ImageRows(nn.Module):
    """(N, 3, H, W) images to (N, H, values per row) sequences: image row t is time step t."""

    def __init__(self, net_name: str, width: int, greyscale: bool) -> None:
        super().__init__()
        self.net_name = net_name
        self.width = width
        self.greyscale = greyscale
        self.row_length = width if greyscale else width * 3

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[-1] != self.width:
            raise TltkError(
                f"{self.net_name} reads 3-channel images {self.width} pixels wide but got a batch of shape "
                f"{tuple(images.shape)}; build it with --backbone-opt size={images.shape[-1]} or leave --input-size out."
            )
        if self.greyscale:
            return images.mean(dim=1)
        return images.permute(0, 2, 3, 1).flatten(2)

    def extra_repr(self) -> str:
        return f"width={self.width}, greyscale={self.greyscale}, row_length={self.row_length}"


class StatesAsMap(nn.Module):
    """The top layer's state after each row, from a torch RNN's ``(output, state)`` pair, as (N, hidden, rows, 1)."""

    def forward(self, rnn_result: tuple[torch.Tensor, object]) -> torch.Tensor:
        return rnn_result[0].transpose(1, 2).unsqueeze(-1)


class LastRow(nn.Module):
    """The state after the last row: for a one-way RNN, exactly the top layer's final hidden state."""

    def forward(self, state_map: torch.Tensor) -> torch.Tensor:
        return state_map[:, :, -1, 0]


class RowSequenceBackbone(Backbone):
    def forward_spatial(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.states(self.net.rnn(self.net.rows(x)))

    def forward_vector(self, spatial: torch.Tensor) -> torch.Tensor:
        return self.net.last(spatial)


def row_sequence_backbone(name: str, rnn: nn.Module, rows: ImageRows, size: int) -> Backbone:
    net = nn.Module()
    net.rows = rows
    net.rnn = rnn
    net.states = StatesAsMap()
    net.last = LastRow()
    return RowSequenceBackbone(
        net,
        name=name,
        feature_dim=rnn.hidden_size,
        spatial_channels=rnn.hidden_size,
        preprocessing=Preprocessing((size, size), HALF_MEAN, HALF_STD),
        layers={},
    )


def _check_shape_options(name: str, hidden: int, layers: int, greyscale: bool, size: int) -> None:
    check_positive_int(name, "hidden", hidden)
    check_positive_int(name, "layers", layers)
    check_flag(name, "greyscale", greyscale)
    check_positive_int(name, "size", size)


def _recurrent(
    name: str, kind: type[nn.RNNBase], hidden: int, layers: int, greyscale: bool, size: int, **extra: str
) -> Backbone:
    _check_shape_options(name, hidden, layers, greyscale, size)
    rows = ImageRows(name, size, greyscale)
    rnn = kind(rows.row_length, hidden, num_layers=layers, batch_first=True, **extra)
    return row_sequence_backbone(name, rnn, rows, size)


@backbone_factory(pretrained=False,
    description="Elman RNN over image rows, last hidden state; 28x28; options hidden, layers, nonlinearity, greyscale, size",
)
def rnn(
    pretrained: bool = False, hidden: int = 128, layers: int = 1, nonlinearity: str = "tanh",
    greyscale: bool = False, size: int = 28,
) -> Backbone:
    """A plain (Elman) RNN: the fastest of the three and the least stable, so train it with ``--clip-grad``."""
    no_pretrained("rnn", pretrained)
    check_choice("rnn", "nonlinearity", nonlinearity, NONLINEARITIES)
    return _recurrent("rnn", nn.RNN, hidden, layers, greyscale, size, nonlinearity=nonlinearity)


@backbone_factory(pretrained=False,
    description="LSTM over image rows, last hidden state; 28x28; options hidden, layers, greyscale, size",
)
def lstm(pretrained: bool = False, hidden: int = 128, layers: int = 1, greyscale: bool = False, size: int = 28) -> Backbone:
    """An LSTM: its gated cell state keeps gradients from vanishing over the rows."""
    no_pretrained("lstm", pretrained)
    return _recurrent("lstm", nn.LSTM, hidden, layers, greyscale, size)


@backbone_factory(pretrained=False,
    description="GRU over image rows, last hidden state; 28x28; options hidden, layers, greyscale, size",
)
def gru(pretrained: bool = False, hidden: int = 128, layers: int = 1, greyscale: bool = False, size: int = 28) -> Backbone:
    """A GRU: gated like the LSTM with a quarter fewer weights; the MNIST report's best sequence model."""
    no_pretrained("gru", pretrained)
    return _recurrent("gru", nn.GRU, hidden, layers, greyscale, size)
