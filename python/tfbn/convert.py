"""tfbn.convert: move an existing Keras model to tfbn's BatchNormalization and back.

The model's graph is rebuilt node by node (Functional), or its layer list is (Sequential):
every layer is a new one made from its config, with its weights copied, so that the
result shares nothing with the original. Layers called several times stay one layer.
With `fuse_epilogue`, a BatchNormalization whose output feeds only an activation, or only
an Add with one other input (then optionally only an activation), becomes one tfbn layer
with `activation` and a `residual`: the tail of a ResNet or MobileNet block in one op.
"""

import keras
from keras.src.models.functional import Functional  # what keras.Model(inputs, outputs) is

from .layers import BatchNormalization as TfbnBatchNormalization

_KerasBN = keras.layers.BatchNormalization
_TARGETS = ("tfbn", "keras")
# The tfbn layer's config keys that Keras' layer does not have.
_TFBN_ONLY_KEYS = ("activation", "inference_op")


def convert(model, *, to="tfbn", fuse_epilogue=True):
    """A copy of `model` with every `keras.layers.BatchNormalization` as a
    `tfbn.BatchNormalization` (to='tfbn'), or every tfbn layer as Keras' own layers
    (to='keras': the epilogue split into `Add` and `Activation` layers).

    The copy has the original's weights and config (the layers keep their names) and
    shares no variable with it; it computes the same outputs in inference and the same
    gradients in training, to float32 rounding. Functional and Sequential models are
    converted, nested ones too, and a layer called at several places stays one (shared)
    layer. A compiled model's compile config is applied to the copy (optimizer state is
    not carried over).

    With `fuse_epilogue=True` (to='tfbn'), these patterns become one tfbn layer with
    `activation` (and a `residual` call argument), when the intermediate tensors feed
    nothing else and are not model outputs:
      BatchNormalization -> ReLU / ReLU(max_value=6) / Activation(relu, relu6, silu, swish)
      BatchNormalization -> Add(with one other input of the same shape) [-> activation]
    A BatchNormalization layer called more than once is converted but not fused.

    Raises TypeError, naming the class, for subclassed models (their call() is Python code,
    so the layers' connections are not known) and for custom layers that hold
    BatchNormalization layers inside.
    """
    if to not in _TARGETS:
        raise ValueError(f"tfbn.convert: to must be 'tfbn' or 'keras', got to={to!r}")
    if not isinstance(fuse_epilogue, bool):
        raise TypeError(
            f"tfbn.convert: fuse_epilogue must be a bool, got fuse_epilogue={fuse_epilogue!r}"
        )
    if not isinstance(model, keras.Model):
        raise TypeError(
            "tfbn.convert: model must be a keras.Model (Functional or Sequential), got "
            f"{type(model).__name__}"
        )
    converter = _Converter(to, fuse_epilogue and to == "tfbn")
    new_model = converter.model(model)
    converter.copy_weights()
    if model.compiled:
        new_model.compile_from_config(model.get_compile_config())
    return new_model


def _epilogue_activation(layer):
    """The tfbn activation name a stock Keras activation layer computes, else None."""
    if type(layer) is keras.layers.ReLU:
        if layer.negative_slope != 0 or layer.threshold != 0:
            return None
        if layer.max_value is None:
            return "relu"
        return "relu6" if float(layer.max_value) == 6.0 else None
    if type(layer) is keras.layers.Activation:
        fn = layer.activation
        if fn is keras.activations.relu:
            return "relu"
        if fn is keras.activations.relu6:
            return "relu6"
        if fn is keras.activations.silu or fn is keras.activations.swish:
            return "silu"
    return None


def _is_subclassed(model):
    if isinstance(model, keras.Sequential):
        return type(model).call is not keras.Sequential.call
    if isinstance(model, Functional):
        return type(model).call is not Functional.call
    return True


class _Converter:
    def __init__(self, to, fuse):
        self.to = to
        self.fuse = fuse
        self.layers = {}  # id(original layer) -> its conversion (layers stay shared)
        self.pairs = []  # (original, new) whose weights are copied once all are built

    # -- layers ----------------------------------------------------------------------

    def model(self, model):
        if _is_subclassed(model):
            raise TypeError(
                f"tfbn.convert: cannot convert {type(model).__name__}, a subclassed "
                "keras.Model: its call() is Python code, so how its layers connect is not "
                "known. Build it as a Functional or Sequential model, or use "
                "tfbn.BatchNormalization in its code."
            )
        if isinstance(model, keras.Sequential):
            return self._sequential(model)
        return self._functional(model)

    def layer(self, layer):
        """The converted counterpart of a non-BatchNormalization layer (or nested model)."""
        if id(layer) in self.layers:
            return self.layers[id(layer)]
        if isinstance(layer, keras.Model):
            new = self.model(layer)
        else:
            if any(self._converts(sub) for sub in layer._flatten_layers(include_self=False)):
                raise TypeError(
                    f"tfbn.convert: cannot convert layer {layer.name!r} of class "
                    f"{type(layer).__name__}: it holds BatchNormalization layers that its "
                    "own call() uses. Use tfbn.BatchNormalization in its code."
                )
            new = self._clone(layer)
        self.layers[id(layer)] = new
        return new

    def _clone(self, layer):
        try:
            new = type(layer).from_config(layer.get_config())
        except Exception as e:  # noqa: BLE001 - any failure means the same thing here
            raise TypeError(
                f"tfbn.convert: cannot copy layer {layer.name!r} of class "
                f"{type(layer).__name__} from its config ({type(e).__name__}: {e})"
            ) from e
        self.pairs.append((layer, new))
        return new

    def batch_norm(self, bn, activation=None):
        """bn's counterpart: tfbn's layer (with `activation` when fused) or Keras' own."""
        if id(bn) in self.layers:
            return self.layers[id(bn)]
        config = bn.get_config()
        if self.to == "tfbn":
            new = TfbnBatchNormalization.from_config(config)
            if activation is not None:
                new.activation = activation
        else:
            for key in _TFBN_ONLY_KEYS:
                config.pop(key, None)
            new = _KerasBN.from_config(config)
        self.pairs.append((bn, new))
        self.layers[id(bn)] = new
        return new

    def copy_weights(self):
        for old, new in self.pairs:
            new.set_weights(old.get_weights())

    # -- Sequential ------------------------------------------------------------------

    def _sequential(self, model):
        old = list(model.layers)
        names = {layer.name for layer in old}
        new_layers, i = [], 0
        while i < len(old):
            layer = old[i]
            if self._converts(layer):
                activation = None
                nxt = old[i + 1] if i + 1 < len(old) else None
                if self.fuse and nxt is not None and self._fusable_activation(layer, nxt):
                    activation = _epilogue_activation(nxt)
                    i += 1
                new_layers += self._split(self.batch_norm(layer, activation), layer, names)
            else:
                new_layers.append(self.layer(layer))
            i += 1
        first = model._layers[0] if model._layers else None
        if isinstance(first, keras.layers.InputLayer):
            spec = first.output  # the input's KerasTensor: its dtype, not the layer policy's
            new_layers.insert(0, keras.Input(batch_shape=spec.shape, dtype=spec.dtype,
                                             name=first.name))
        return keras.Sequential(new_layers, name=model.name, trainable=model.trainable)

    def _split(self, new_bn, old_bn, names):
        """Sequential to='keras': the activation of a tfbn layer as a layer of its own."""
        activation = getattr(old_bn, "activation", None)
        if self.to != "keras" or activation is None:
            return [new_bn]
        name = _unique(f"{old_bn.name}_{activation}", names)
        return [new_bn, keras.layers.Activation(activation, name=name)]

    def _converts(self, layer):
        if self.to == "tfbn":
            return isinstance(layer, _KerasBN) and not isinstance(layer, TfbnBatchNormalization)
        return isinstance(layer, TfbnBatchNormalization)

    def _fusable_activation(self, bn, act):
        return (_epilogue_activation(act) is not None
                and act.dtype_policy.name == bn.dtype_policy.name)

    # -- Functional ------------------------------------------------------------------

    def _functional(self, model):
        new_inputs = keras.tree.map_structure(
            lambda x: keras.Input(batch_shape=x.shape, dtype=x.dtype, name=x.name),
            model._inputs_struct,
        )
        tensors = {id(x): y for x, y in zip(model.inputs, keras.tree.flatten(new_inputs))}
        graph = _Graph(model)
        plan = graph.fusion_plan(self) if self.fuse else {}
        names = {layer.name for layer in model.layers}
        for node in graph.nodes:
            if any(id(x) not in tensors for x in node.input_tensors):
                continue  # not computable from the inputs (as Keras skips it)
            args, kwargs = node.arguments.fill_in(tensors)
            layer = node.operation
            step = plan.get(id(node))
            if step is not None:
                outputs = step(self, tensors)
            elif self._converts(layer):
                outputs = self._call_bn(layer, args, kwargs, names)
            else:
                outputs = self.layer(layer)(*args, **kwargs)
            for x, y in zip(node.outputs, keras.tree.flatten(outputs)):
                tensors[id(x)] = y
        new_outputs = keras.tree.map_structure(lambda x: tensors[id(x)], model._outputs_struct)
        return keras.Model(new_inputs, new_outputs, name=model.name, trainable=model.trainable)

    def _call_bn(self, bn, args, kwargs, names):
        new = self.batch_norm(bn)
        if self.to == "tfbn":
            return new(*args, **kwargs)
        # to='keras': Keras' BatchNormalization, then the epilogue as layers of its own.
        kwargs = dict(kwargs)
        residual = kwargs.pop("residual", None)
        if len(args) > 3:  # positional (inputs, training, mask, residual)
            args, residual = args[:3], args[3]
        y = new(*args, **kwargs)
        if residual is not None:
            y = keras.layers.Add(name=_unique(f"{bn.name}_add", names))([y, residual])
        if bn.activation is not None:
            y = keras.layers.Activation(
                bn.activation, name=_unique(f"{bn.name}_{bn.activation}", names))(y)
        return y


def _unique(name, names):
    base, i = name, 1
    while name in names:
        name = f"{base}_{i}"
        i += 1
    names.add(name)
    return name


class _Graph:
    """A Functional model's nodes in execution order and who consumes each tensor."""

    def __init__(self, model):
        self.nodes = []
        for depth in sorted(model._nodes_by_depth, reverse=True):
            for node in model._nodes_by_depth[depth]:
                if node.operation is not None and not node.is_input:
                    self.nodes.append(node)
        self.consumers = {}  # id(tensor) -> nodes that take it
        for node in self.nodes:
            for x in {id(t): t for t in node.input_tensors}.values():
                self.consumers.setdefault(id(x), []).append(node)
        self.outputs = {id(x) for x in model.outputs}
        self.calls = {}  # id(layer) -> its number of nodes in this model
        for node in self.nodes:
            self.calls[id(node.operation)] = self.calls.get(id(node.operation), 0) + 1

    def only_consumer(self, tensor):
        """The one node taking `tensor`, if it feeds exactly one node and is no output."""
        users = self.consumers.get(id(tensor), [])
        if len(users) != 1 or id(tensor) in self.outputs:
            return None
        return users[0]

    def fusion_plan(self, converter):
        """{id(node): step}: a step computes a node's outputs from the tensors mapped so
        far. The fused tfbn layer runs at the pattern's last node; its other nodes pass
        their input through (they feed only the next node of the pattern)."""
        plan = {}
        for node in self.nodes:
            bn = node.operation
            if not converter._converts(bn) or self.calls[id(bn)] != 1:
                continue
            if len(node.outputs) != 1 or node.arguments.kwargs.get("mask") is not None:
                continue
            pattern = self._match(converter, node)
            if pattern is None:
                continue
            add, residual, act_node = pattern
            # An Add of two BatchNormalizations (a projection shortcut) fuses one of them;
            # the other is computed on its own and becomes the residual.
            if any(id(n) in plan for n in (add, act_node) if n is not None):
                continue
            activation = _epilogue_activation(act_node.operation) if act_node else None
            last = act_node or add
            plan[id(node)] = _passthrough(node)
            if add is not None and act_node is not None:
                plan[id(add)] = _passthrough(add)
            plan[id(last)] = _fused_step(node, residual, activation)
        return plan

    def _match(self, converter, node):
        """(add node or None, residual tensor or None, activation node or None)."""
        bn, y = node.operation, node.outputs[0]
        user = self.only_consumer(y)
        if user is None or len(user.outputs) != 1:
            return None
        if converter._fusable_activation(bn, user.operation):
            return None, None, user
        if type(user.operation) is not keras.layers.Add:
            return None
        if user.operation.dtype_policy.name != bn.dtype_policy.name:
            return None
        operands = user.input_tensors
        others = [t for t in operands if t is not y]
        if len(operands) != 2 or len(others) != 1 or tuple(others[0].shape) != tuple(y.shape):
            return None
        if others[0].dtype != y.dtype:
            return None
        after = self.only_consumer(user.outputs[0])
        if after is not None and len(after.outputs) == 1 and converter._fusable_activation(
                bn, after.operation):
            return user, others[0], after
        return user, others[0], None


def _passthrough(node):
    """A fused pattern's inner node. Only the pattern's next node reads its output, and
    the fused layer at the pattern's end reads its own inputs, so any tensor will do: the
    node's first input."""
    def step(converter, tensors):
        return tensors[id(node.input_tensors[0])]
    return step


def _fused_step(bn_node, residual, activation):
    def step(converter, tensors):
        layer = converter.batch_norm(bn_node.operation, activation)
        args, kwargs = bn_node.arguments.fill_in(tensors)
        if residual is not None:
            kwargs = dict(kwargs, residual=tensors[id(residual)])
        return layer(*args, **kwargs)
    return step
