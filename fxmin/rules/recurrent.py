"""Recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``): kept whole, with every feature of their input.

NOTE [Recurrent layers kept whole]
A recurrent layer mixes every input feature into every hidden unit at every step, through gates whose
nonlinearities do not map a constant feature to a bias the way a Linear layer's does over one step
only. fxmin does not shrink these layers: it reads every feature of their input and treats what they
return as values it does not follow, which is exact. The layers around them shrink as usual up to
their input (timm's Sequencer2D: its channel MLPs shrink, its LSTMs stay).
"""
from __future__ import annotations

import torch
from torch import nn

from .api import rule
from .kit import opaque_forward

rule("recurrent", doc=(
         'Always: the layer is kept whole and reads every feature of its input (NOTE [Recurrent layers kept whole]).',
         'Nothing.',
         'Every feature of its input; its outputs are not followed.',
         ),
     modules=(nn.LSTM, nn.GRU, nn.RNN),
     functions=tuple(getattr(torch.ops.aten, name).input for name in ("lstm", "gru", "rnn_tanh", "rnn_relu")))(opaque_forward)
