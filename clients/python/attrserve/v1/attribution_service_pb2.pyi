from attrserve.v1 import model_config_pb2 as _model_config_pb2
from attrserve.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Algorithm(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ALGORITHM_UNSPECIFIED: _ClassVar[Algorithm]
    ALGORITHM_INTEGRATED_GRADIENTS: _ClassVar[Algorithm]
    ALGORITHM_SALIENCY: _ClassVar[Algorithm]
    ALGORITHM_INPUT_X_GRADIENT: _ClassVar[Algorithm]
    ALGORITHM_DEEP_LIFT: _ClassVar[Algorithm]
    ALGORITHM_GRADIENT_SHAP: _ClassVar[Algorithm]
    ALGORITHM_FEATURE_ABLATION: _ClassVar[Algorithm]
    ALGORITHM_FEATURE_PERMUTATION: _ClassVar[Algorithm]
    ALGORITHM_OCCLUSION: _ClassVar[Algorithm]
    ALGORITHM_SHAPLEY_VALUE_SAMPLING: _ClassVar[Algorithm]
    ALGORITHM_SHAPLEY_VALUES: _ClassVar[Algorithm]
    ALGORITHM_LIME: _ClassVar[Algorithm]
    ALGORITHM_KERNEL_SHAP: _ClassVar[Algorithm]
    ALGORITHM_DEEP_LIFT_SHAP: _ClassVar[Algorithm]
    ALGORITHM_GUIDED_BACKPROP: _ClassVar[Algorithm]
    ALGORITHM_DECONVOLUTION: _ClassVar[Algorithm]
    ALGORITHM_LRP: _ClassVar[Algorithm]
    ALGORITHM_LAYER_INTEGRATED_GRADIENTS: _ClassVar[Algorithm]
    ALGORITHM_LAYER_CONDUCTANCE: _ClassVar[Algorithm]
    ALGORITHM_INTERNAL_INFLUENCE: _ClassVar[Algorithm]
    ALGORITHM_LAYER_GRADIENT_X_ACTIVATION: _ClassVar[Algorithm]
    ALGORITHM_LAYER_ACTIVATION: _ClassVar[Algorithm]
    ALGORITHM_LAYER_GRAD_CAM: _ClassVar[Algorithm]
    ALGORITHM_LAYER_DEEP_LIFT: _ClassVar[Algorithm]
    ALGORITHM_LAYER_DEEP_LIFT_SHAP: _ClassVar[Algorithm]
    ALGORITHM_LAYER_GRADIENT_SHAP: _ClassVar[Algorithm]
    ALGORITHM_LAYER_FEATURE_ABLATION: _ClassVar[Algorithm]
    ALGORITHM_LAYER_LRP: _ClassVar[Algorithm]
    ALGORITHM_GUIDED_GRAD_CAM: _ClassVar[Algorithm]
    ALGORITHM_NEURON_GRADIENT: _ClassVar[Algorithm]
    ALGORITHM_NEURON_INTEGRATED_GRADIENTS: _ClassVar[Algorithm]
    ALGORITHM_NEURON_CONDUCTANCE: _ClassVar[Algorithm]
    ALGORITHM_NEURON_DEEP_LIFT: _ClassVar[Algorithm]
    ALGORITHM_NEURON_DEEP_LIFT_SHAP: _ClassVar[Algorithm]
    ALGORITHM_NEURON_GRADIENT_SHAP: _ClassVar[Algorithm]
    ALGORITHM_NEURON_GUIDED_BACKPROP: _ClassVar[Algorithm]
    ALGORITHM_NEURON_DECONVOLUTION: _ClassVar[Algorithm]
    ALGORITHM_NEURON_FEATURE_ABLATION: _ClassVar[Algorithm]

class Priority(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRIORITY_UNSPECIFIED: _ClassVar[Priority]
    PRIORITY_INTERACTIVE: _ClassVar[Priority]
    PRIORITY_BATCH: _ClassVar[Priority]

class ModelState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_STATE_UNSPECIFIED: _ClassVar[ModelState]
    MODEL_STATE_UNLOADED: _ClassVar[ModelState]
    MODEL_STATE_LOADING: _ClassVar[ModelState]
    MODEL_STATE_READY: _ClassVar[ModelState]
    MODEL_STATE_UNAVAILABLE: _ClassVar[ModelState]
    MODEL_STATE_UNLOADING: _ClassVar[ModelState]
ALGORITHM_UNSPECIFIED: Algorithm
ALGORITHM_INTEGRATED_GRADIENTS: Algorithm
ALGORITHM_SALIENCY: Algorithm
ALGORITHM_INPUT_X_GRADIENT: Algorithm
ALGORITHM_DEEP_LIFT: Algorithm
ALGORITHM_GRADIENT_SHAP: Algorithm
ALGORITHM_FEATURE_ABLATION: Algorithm
ALGORITHM_FEATURE_PERMUTATION: Algorithm
ALGORITHM_OCCLUSION: Algorithm
ALGORITHM_SHAPLEY_VALUE_SAMPLING: Algorithm
ALGORITHM_SHAPLEY_VALUES: Algorithm
ALGORITHM_LIME: Algorithm
ALGORITHM_KERNEL_SHAP: Algorithm
ALGORITHM_DEEP_LIFT_SHAP: Algorithm
ALGORITHM_GUIDED_BACKPROP: Algorithm
ALGORITHM_DECONVOLUTION: Algorithm
ALGORITHM_LRP: Algorithm
ALGORITHM_LAYER_INTEGRATED_GRADIENTS: Algorithm
ALGORITHM_LAYER_CONDUCTANCE: Algorithm
ALGORITHM_INTERNAL_INFLUENCE: Algorithm
ALGORITHM_LAYER_GRADIENT_X_ACTIVATION: Algorithm
ALGORITHM_LAYER_ACTIVATION: Algorithm
ALGORITHM_LAYER_GRAD_CAM: Algorithm
ALGORITHM_LAYER_DEEP_LIFT: Algorithm
ALGORITHM_LAYER_DEEP_LIFT_SHAP: Algorithm
ALGORITHM_LAYER_GRADIENT_SHAP: Algorithm
ALGORITHM_LAYER_FEATURE_ABLATION: Algorithm
ALGORITHM_LAYER_LRP: Algorithm
ALGORITHM_GUIDED_GRAD_CAM: Algorithm
ALGORITHM_NEURON_GRADIENT: Algorithm
ALGORITHM_NEURON_INTEGRATED_GRADIENTS: Algorithm
ALGORITHM_NEURON_CONDUCTANCE: Algorithm
ALGORITHM_NEURON_DEEP_LIFT: Algorithm
ALGORITHM_NEURON_DEEP_LIFT_SHAP: Algorithm
ALGORITHM_NEURON_GRADIENT_SHAP: Algorithm
ALGORITHM_NEURON_GUIDED_BACKPROP: Algorithm
ALGORITHM_NEURON_DECONVOLUTION: Algorithm
ALGORITHM_NEURON_FEATURE_ABLATION: Algorithm
PRIORITY_UNSPECIFIED: Priority
PRIORITY_INTERACTIVE: Priority
PRIORITY_BATCH: Priority
MODEL_STATE_UNSPECIFIED: ModelState
MODEL_STATE_UNLOADED: ModelState
MODEL_STATE_LOADING: ModelState
MODEL_STATE_READY: ModelState
MODEL_STATE_UNAVAILABLE: ModelState
MODEL_STATE_UNLOADING: ModelState

class IntList(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, values: _Optional[_Iterable[int]] = ...) -> None: ...

class Baseline(_message.Message):
    __slots__ = ("tensor", "scalar")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    SCALAR_FIELD_NUMBER: _ClassVar[int]
    tensor: _tensor_pb2.Tensor
    scalar: float
    def __init__(self, tensor: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., scalar: _Optional[float] = ...) -> None: ...

class TargetIndex(_message.Message):
    __slots__ = ("index",)
    INDEX_FIELD_NUMBER: _ClassVar[int]
    index: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, index: _Optional[_Iterable[int]] = ...) -> None: ...

class Target(_message.Message):
    __slots__ = ("index", "tuple", "per_example")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TUPLE_FIELD_NUMBER: _ClassVar[int]
    PER_EXAMPLE_FIELD_NUMBER: _ClassVar[int]
    index: int
    tuple: TargetIndex
    per_example: TargetIndexList
    def __init__(self, index: _Optional[int] = ..., tuple: _Optional[_Union[TargetIndex, _Mapping]] = ..., per_example: _Optional[_Union[TargetIndexList, _Mapping]] = ...) -> None: ...

class TargetIndexList(_message.Message):
    __slots__ = ("indices",)
    INDICES_FIELD_NUMBER: _ClassVar[int]
    indices: _containers.RepeatedCompositeFieldContainer[TargetIndex]
    def __init__(self, indices: _Optional[_Iterable[_Union[TargetIndex, _Mapping]]] = ...) -> None: ...

class IntegratedGradientsParams(_message.Message):
    __slots__ = ("n_steps", "method", "multiply_by_inputs", "internal_batch_size")
    N_STEPS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    MULTIPLY_BY_INPUTS_FIELD_NUMBER: _ClassVar[int]
    INTERNAL_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    n_steps: int
    method: str
    multiply_by_inputs: bool
    internal_batch_size: int
    def __init__(self, n_steps: _Optional[int] = ..., method: _Optional[str] = ..., multiply_by_inputs: _Optional[bool] = ..., internal_batch_size: _Optional[int] = ...) -> None: ...

class SaliencyParams(_message.Message):
    __slots__ = ("abs",)
    ABS_FIELD_NUMBER: _ClassVar[int]
    abs: bool
    def __init__(self, abs: _Optional[bool] = ...) -> None: ...

class DeepLiftParams(_message.Message):
    __slots__ = ("multiply_by_inputs", "eps")
    MULTIPLY_BY_INPUTS_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    multiply_by_inputs: bool
    eps: float
    def __init__(self, multiply_by_inputs: _Optional[bool] = ..., eps: _Optional[float] = ...) -> None: ...

class GradientShapParams(_message.Message):
    __slots__ = ("n_samples", "stdevs", "multiply_by_inputs")
    N_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    STDEVS_FIELD_NUMBER: _ClassVar[int]
    MULTIPLY_BY_INPUTS_FIELD_NUMBER: _ClassVar[int]
    n_samples: int
    stdevs: _containers.RepeatedScalarFieldContainer[float]
    multiply_by_inputs: bool
    def __init__(self, n_samples: _Optional[int] = ..., stdevs: _Optional[_Iterable[float]] = ..., multiply_by_inputs: _Optional[bool] = ...) -> None: ...

class FeatureAblationParams(_message.Message):
    __slots__ = ("perturbations_per_eval",)
    PERTURBATIONS_PER_EVAL_FIELD_NUMBER: _ClassVar[int]
    perturbations_per_eval: int
    def __init__(self, perturbations_per_eval: _Optional[int] = ...) -> None: ...

class FeaturePermutationParams(_message.Message):
    __slots__ = ("perturbations_per_eval",)
    PERTURBATIONS_PER_EVAL_FIELD_NUMBER: _ClassVar[int]
    perturbations_per_eval: int
    def __init__(self, perturbations_per_eval: _Optional[int] = ...) -> None: ...

class OcclusionParams(_message.Message):
    __slots__ = ("sliding_window_shapes", "strides", "perturbations_per_eval")
    SLIDING_WINDOW_SHAPES_FIELD_NUMBER: _ClassVar[int]
    STRIDES_FIELD_NUMBER: _ClassVar[int]
    PERTURBATIONS_PER_EVAL_FIELD_NUMBER: _ClassVar[int]
    sliding_window_shapes: _containers.RepeatedCompositeFieldContainer[IntList]
    strides: _containers.RepeatedCompositeFieldContainer[IntList]
    perturbations_per_eval: int
    def __init__(self, sliding_window_shapes: _Optional[_Iterable[_Union[IntList, _Mapping]]] = ..., strides: _Optional[_Iterable[_Union[IntList, _Mapping]]] = ..., perturbations_per_eval: _Optional[int] = ...) -> None: ...

class ShapleyValueSamplingParams(_message.Message):
    __slots__ = ("n_samples", "perturbations_per_eval")
    N_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    PERTURBATIONS_PER_EVAL_FIELD_NUMBER: _ClassVar[int]
    n_samples: int
    perturbations_per_eval: int
    def __init__(self, n_samples: _Optional[int] = ..., perturbations_per_eval: _Optional[int] = ...) -> None: ...

class ShapleyValuesParams(_message.Message):
    __slots__ = ("perturbations_per_eval",)
    PERTURBATIONS_PER_EVAL_FIELD_NUMBER: _ClassVar[int]
    perturbations_per_eval: int
    def __init__(self, perturbations_per_eval: _Optional[int] = ...) -> None: ...

class LimeParams(_message.Message):
    __slots__ = ("n_samples", "perturbations_per_eval", "alpha", "kernel_width")
    N_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    PERTURBATIONS_PER_EVAL_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    KERNEL_WIDTH_FIELD_NUMBER: _ClassVar[int]
    n_samples: int
    perturbations_per_eval: int
    alpha: float
    kernel_width: float
    def __init__(self, n_samples: _Optional[int] = ..., perturbations_per_eval: _Optional[int] = ..., alpha: _Optional[float] = ..., kernel_width: _Optional[float] = ...) -> None: ...

class KernelShapParams(_message.Message):
    __slots__ = ("n_samples", "perturbations_per_eval")
    N_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    PERTURBATIONS_PER_EVAL_FIELD_NUMBER: _ClassVar[int]
    n_samples: int
    perturbations_per_eval: int
    def __init__(self, n_samples: _Optional[int] = ..., perturbations_per_eval: _Optional[int] = ...) -> None: ...

class DeepLiftShapParams(_message.Message):
    __slots__ = ("multiply_by_inputs",)
    MULTIPLY_BY_INPUTS_FIELD_NUMBER: _ClassVar[int]
    multiply_by_inputs: bool
    def __init__(self, multiply_by_inputs: _Optional[bool] = ...) -> None: ...

class LayerIntegratedGradientsParams(_message.Message):
    __slots__ = ("n_steps", "method", "multiply_by_inputs", "attribute_to_layer_input", "internal_batch_size")
    N_STEPS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    MULTIPLY_BY_INPUTS_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTE_TO_LAYER_INPUT_FIELD_NUMBER: _ClassVar[int]
    INTERNAL_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    n_steps: int
    method: str
    multiply_by_inputs: bool
    attribute_to_layer_input: bool
    internal_batch_size: int
    def __init__(self, n_steps: _Optional[int] = ..., method: _Optional[str] = ..., multiply_by_inputs: _Optional[bool] = ..., attribute_to_layer_input: _Optional[bool] = ..., internal_batch_size: _Optional[int] = ...) -> None: ...

class LayerConductanceParams(_message.Message):
    __slots__ = ("n_steps", "method", "attribute_to_layer_input", "internal_batch_size")
    N_STEPS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTE_TO_LAYER_INPUT_FIELD_NUMBER: _ClassVar[int]
    INTERNAL_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    n_steps: int
    method: str
    attribute_to_layer_input: bool
    internal_batch_size: int
    def __init__(self, n_steps: _Optional[int] = ..., method: _Optional[str] = ..., attribute_to_layer_input: _Optional[bool] = ..., internal_batch_size: _Optional[int] = ...) -> None: ...

class InternalInfluenceParams(_message.Message):
    __slots__ = ("n_steps", "method", "attribute_to_layer_input", "internal_batch_size")
    N_STEPS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTE_TO_LAYER_INPUT_FIELD_NUMBER: _ClassVar[int]
    INTERNAL_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    n_steps: int
    method: str
    attribute_to_layer_input: bool
    internal_batch_size: int
    def __init__(self, n_steps: _Optional[int] = ..., method: _Optional[str] = ..., attribute_to_layer_input: _Optional[bool] = ..., internal_batch_size: _Optional[int] = ...) -> None: ...

class LayerGradientXActivationParams(_message.Message):
    __slots__ = ("multiply_by_inputs", "attribute_to_layer_input")
    MULTIPLY_BY_INPUTS_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTE_TO_LAYER_INPUT_FIELD_NUMBER: _ClassVar[int]
    multiply_by_inputs: bool
    attribute_to_layer_input: bool
    def __init__(self, multiply_by_inputs: _Optional[bool] = ..., attribute_to_layer_input: _Optional[bool] = ...) -> None: ...

class LayerActivationParams(_message.Message):
    __slots__ = ("attribute_to_layer_input",)
    ATTRIBUTE_TO_LAYER_INPUT_FIELD_NUMBER: _ClassVar[int]
    attribute_to_layer_input: bool
    def __init__(self, attribute_to_layer_input: _Optional[bool] = ...) -> None: ...

class LayerGradCamParams(_message.Message):
    __slots__ = ("relu_attributions", "attr_dim_summation", "attribute_to_layer_input")
    RELU_ATTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    ATTR_DIM_SUMMATION_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTE_TO_LAYER_INPUT_FIELD_NUMBER: _ClassVar[int]
    relu_attributions: bool
    attr_dim_summation: bool
    attribute_to_layer_input: bool
    def __init__(self, relu_attributions: _Optional[bool] = ..., attr_dim_summation: _Optional[bool] = ..., attribute_to_layer_input: _Optional[bool] = ...) -> None: ...

class LayerDeepLiftParams(_message.Message):
    __slots__ = ("multiply_by_inputs", "attribute_to_layer_input")
    MULTIPLY_BY_INPUTS_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTE_TO_LAYER_INPUT_FIELD_NUMBER: _ClassVar[int]
    multiply_by_inputs: bool
    attribute_to_layer_input: bool
    def __init__(self, multiply_by_inputs: _Optional[bool] = ..., attribute_to_layer_input: _Optional[bool] = ...) -> None: ...

class LayerDeepLiftShapParams(_message.Message):
    __slots__ = ("multiply_by_inputs", "attribute_to_layer_input")
    MULTIPLY_BY_INPUTS_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTE_TO_LAYER_INPUT_FIELD_NUMBER: _ClassVar[int]
    multiply_by_inputs: bool
    attribute_to_layer_input: bool
    def __init__(self, multiply_by_inputs: _Optional[bool] = ..., attribute_to_layer_input: _Optional[bool] = ...) -> None: ...

class LayerGradientShapParams(_message.Message):
    __slots__ = ("n_samples", "stdevs", "multiply_by_inputs", "attribute_to_layer_input")
    N_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    STDEVS_FIELD_NUMBER: _ClassVar[int]
    MULTIPLY_BY_INPUTS_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTE_TO_LAYER_INPUT_FIELD_NUMBER: _ClassVar[int]
    n_samples: int
    stdevs: _containers.RepeatedScalarFieldContainer[float]
    multiply_by_inputs: bool
    attribute_to_layer_input: bool
    def __init__(self, n_samples: _Optional[int] = ..., stdevs: _Optional[_Iterable[float]] = ..., multiply_by_inputs: _Optional[bool] = ..., attribute_to_layer_input: _Optional[bool] = ...) -> None: ...

class LayerFeatureAblationParams(_message.Message):
    __slots__ = ("layer_baselines", "perturbations_per_eval", "attribute_to_layer_input")
    LAYER_BASELINES_FIELD_NUMBER: _ClassVar[int]
    PERTURBATIONS_PER_EVAL_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTE_TO_LAYER_INPUT_FIELD_NUMBER: _ClassVar[int]
    layer_baselines: float
    perturbations_per_eval: int
    attribute_to_layer_input: bool
    def __init__(self, layer_baselines: _Optional[float] = ..., perturbations_per_eval: _Optional[int] = ..., attribute_to_layer_input: _Optional[bool] = ...) -> None: ...

class LRPParams(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LayerLRPParams(_message.Message):
    __slots__ = ("attribute_to_layer_input",)
    ATTRIBUTE_TO_LAYER_INPUT_FIELD_NUMBER: _ClassVar[int]
    attribute_to_layer_input: bool
    def __init__(self, attribute_to_layer_input: _Optional[bool] = ...) -> None: ...

class GuidedGradCamParams(_message.Message):
    __slots__ = ("interpolate_mode", "attribute_to_layer_input")
    INTERPOLATE_MODE_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTE_TO_LAYER_INPUT_FIELD_NUMBER: _ClassVar[int]
    interpolate_mode: str
    attribute_to_layer_input: bool
    def __init__(self, interpolate_mode: _Optional[str] = ..., attribute_to_layer_input: _Optional[bool] = ...) -> None: ...

class NeuronGradientParams(_message.Message):
    __slots__ = ("neuron_selector", "attribute_to_neuron_input")
    NEURON_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTE_TO_NEURON_INPUT_FIELD_NUMBER: _ClassVar[int]
    neuron_selector: _containers.RepeatedScalarFieldContainer[int]
    attribute_to_neuron_input: bool
    def __init__(self, neuron_selector: _Optional[_Iterable[int]] = ..., attribute_to_neuron_input: _Optional[bool] = ...) -> None: ...

class NeuronIntegratedGradientsParams(_message.Message):
    __slots__ = ("neuron_selector", "attribute_to_neuron_input", "n_steps", "method", "multiply_by_inputs", "internal_batch_size")
    NEURON_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTE_TO_NEURON_INPUT_FIELD_NUMBER: _ClassVar[int]
    N_STEPS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    MULTIPLY_BY_INPUTS_FIELD_NUMBER: _ClassVar[int]
    INTERNAL_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    neuron_selector: _containers.RepeatedScalarFieldContainer[int]
    attribute_to_neuron_input: bool
    n_steps: int
    method: str
    multiply_by_inputs: bool
    internal_batch_size: int
    def __init__(self, neuron_selector: _Optional[_Iterable[int]] = ..., attribute_to_neuron_input: _Optional[bool] = ..., n_steps: _Optional[int] = ..., method: _Optional[str] = ..., multiply_by_inputs: _Optional[bool] = ..., internal_batch_size: _Optional[int] = ...) -> None: ...

class NeuronConductanceParams(_message.Message):
    __slots__ = ("neuron_selector", "attribute_to_neuron_input", "n_steps", "method", "multiply_by_inputs", "internal_batch_size")
    NEURON_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTE_TO_NEURON_INPUT_FIELD_NUMBER: _ClassVar[int]
    N_STEPS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    MULTIPLY_BY_INPUTS_FIELD_NUMBER: _ClassVar[int]
    INTERNAL_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    neuron_selector: _containers.RepeatedScalarFieldContainer[int]
    attribute_to_neuron_input: bool
    n_steps: int
    method: str
    multiply_by_inputs: bool
    internal_batch_size: int
    def __init__(self, neuron_selector: _Optional[_Iterable[int]] = ..., attribute_to_neuron_input: _Optional[bool] = ..., n_steps: _Optional[int] = ..., method: _Optional[str] = ..., multiply_by_inputs: _Optional[bool] = ..., internal_batch_size: _Optional[int] = ...) -> None: ...

class NeuronDeepLiftParams(_message.Message):
    __slots__ = ("neuron_selector", "attribute_to_neuron_input", "multiply_by_inputs")
    NEURON_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTE_TO_NEURON_INPUT_FIELD_NUMBER: _ClassVar[int]
    MULTIPLY_BY_INPUTS_FIELD_NUMBER: _ClassVar[int]
    neuron_selector: _containers.RepeatedScalarFieldContainer[int]
    attribute_to_neuron_input: bool
    multiply_by_inputs: bool
    def __init__(self, neuron_selector: _Optional[_Iterable[int]] = ..., attribute_to_neuron_input: _Optional[bool] = ..., multiply_by_inputs: _Optional[bool] = ...) -> None: ...

class NeuronGradientShapParams(_message.Message):
    __slots__ = ("neuron_selector", "attribute_to_neuron_input", "n_samples", "stdevs", "multiply_by_inputs")
    NEURON_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTE_TO_NEURON_INPUT_FIELD_NUMBER: _ClassVar[int]
    N_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    STDEVS_FIELD_NUMBER: _ClassVar[int]
    MULTIPLY_BY_INPUTS_FIELD_NUMBER: _ClassVar[int]
    neuron_selector: _containers.RepeatedScalarFieldContainer[int]
    attribute_to_neuron_input: bool
    n_samples: int
    stdevs: _containers.RepeatedScalarFieldContainer[float]
    multiply_by_inputs: bool
    def __init__(self, neuron_selector: _Optional[_Iterable[int]] = ..., attribute_to_neuron_input: _Optional[bool] = ..., n_samples: _Optional[int] = ..., stdevs: _Optional[_Iterable[float]] = ..., multiply_by_inputs: _Optional[bool] = ...) -> None: ...

class NeuronDeepLiftShapParams(_message.Message):
    __slots__ = ("neuron_selector", "attribute_to_neuron_input", "multiply_by_inputs")
    NEURON_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTE_TO_NEURON_INPUT_FIELD_NUMBER: _ClassVar[int]
    MULTIPLY_BY_INPUTS_FIELD_NUMBER: _ClassVar[int]
    neuron_selector: _containers.RepeatedScalarFieldContainer[int]
    attribute_to_neuron_input: bool
    multiply_by_inputs: bool
    def __init__(self, neuron_selector: _Optional[_Iterable[int]] = ..., attribute_to_neuron_input: _Optional[bool] = ..., multiply_by_inputs: _Optional[bool] = ...) -> None: ...

class NeuronGuidedBackpropParams(_message.Message):
    __slots__ = ("neuron_selector", "attribute_to_neuron_input")
    NEURON_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTE_TO_NEURON_INPUT_FIELD_NUMBER: _ClassVar[int]
    neuron_selector: _containers.RepeatedScalarFieldContainer[int]
    attribute_to_neuron_input: bool
    def __init__(self, neuron_selector: _Optional[_Iterable[int]] = ..., attribute_to_neuron_input: _Optional[bool] = ...) -> None: ...

class NeuronDeconvolutionParams(_message.Message):
    __slots__ = ("neuron_selector", "attribute_to_neuron_input")
    NEURON_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTE_TO_NEURON_INPUT_FIELD_NUMBER: _ClassVar[int]
    neuron_selector: _containers.RepeatedScalarFieldContainer[int]
    attribute_to_neuron_input: bool
    def __init__(self, neuron_selector: _Optional[_Iterable[int]] = ..., attribute_to_neuron_input: _Optional[bool] = ...) -> None: ...

class NeuronFeatureAblationParams(_message.Message):
    __slots__ = ("neuron_selector", "attribute_to_neuron_input", "perturbations_per_eval")
    NEURON_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTE_TO_NEURON_INPUT_FIELD_NUMBER: _ClassVar[int]
    PERTURBATIONS_PER_EVAL_FIELD_NUMBER: _ClassVar[int]
    neuron_selector: _containers.RepeatedScalarFieldContainer[int]
    attribute_to_neuron_input: bool
    perturbations_per_eval: int
    def __init__(self, neuron_selector: _Optional[_Iterable[int]] = ..., attribute_to_neuron_input: _Optional[bool] = ..., perturbations_per_eval: _Optional[int] = ...) -> None: ...

class NoiseTunnel(_message.Message):
    __slots__ = ("nt_type", "nt_samples", "stdevs", "draw_baseline_from_distrib", "nt_samples_batch_size")
    NT_TYPE_FIELD_NUMBER: _ClassVar[int]
    NT_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    STDEVS_FIELD_NUMBER: _ClassVar[int]
    DRAW_BASELINE_FROM_DISTRIB_FIELD_NUMBER: _ClassVar[int]
    NT_SAMPLES_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    nt_type: str
    nt_samples: int
    stdevs: _containers.RepeatedScalarFieldContainer[float]
    draw_baseline_from_distrib: bool
    nt_samples_batch_size: int
    def __init__(self, nt_type: _Optional[str] = ..., nt_samples: _Optional[int] = ..., stdevs: _Optional[_Iterable[float]] = ..., draw_baseline_from_distrib: _Optional[bool] = ..., nt_samples_batch_size: _Optional[int] = ...) -> None: ...

class AttributeRequest(_message.Message):
    __slots__ = ("request_id", "model", "model_version", "algorithm", "inputs", "baselines", "target", "additional_forward_args", "layer", "integrated_gradients", "saliency", "deep_lift", "gradient_shap", "feature_ablation", "feature_permutation", "occlusion", "shapley_value_sampling", "shapley_values", "lime", "kernel_shap", "deep_lift_shap", "layer_integrated_gradients", "layer_conductance", "internal_influence", "layer_gradient_x_activation", "layer_activation", "layer_grad_cam", "layer_deep_lift", "layer_deep_lift_shap", "layer_gradient_shap", "layer_feature_ablation", "lrp", "layer_lrp", "guided_grad_cam", "neuron_gradient", "neuron_integrated_gradients", "neuron_conductance", "neuron_deep_lift", "neuron_gradient_shap", "neuron_deep_lift_shap", "neuron_guided_backprop", "neuron_deconvolution", "neuron_feature_ablation", "noise_tunnel", "return_convergence_delta", "seed", "feature_masks", "return_outputs", "custom_algorithm", "custom_params", "also", "evaluate", "priority")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    BASELINES_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    ADDITIONAL_FORWARD_ARGS_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    INTEGRATED_GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    SALIENCY_FIELD_NUMBER: _ClassVar[int]
    DEEP_LIFT_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_SHAP_FIELD_NUMBER: _ClassVar[int]
    FEATURE_ABLATION_FIELD_NUMBER: _ClassVar[int]
    FEATURE_PERMUTATION_FIELD_NUMBER: _ClassVar[int]
    OCCLUSION_FIELD_NUMBER: _ClassVar[int]
    SHAPLEY_VALUE_SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SHAPLEY_VALUES_FIELD_NUMBER: _ClassVar[int]
    LIME_FIELD_NUMBER: _ClassVar[int]
    KERNEL_SHAP_FIELD_NUMBER: _ClassVar[int]
    DEEP_LIFT_SHAP_FIELD_NUMBER: _ClassVar[int]
    LAYER_INTEGRATED_GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    LAYER_CONDUCTANCE_FIELD_NUMBER: _ClassVar[int]
    INTERNAL_INFLUENCE_FIELD_NUMBER: _ClassVar[int]
    LAYER_GRADIENT_X_ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    LAYER_ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    LAYER_GRAD_CAM_FIELD_NUMBER: _ClassVar[int]
    LAYER_DEEP_LIFT_FIELD_NUMBER: _ClassVar[int]
    LAYER_DEEP_LIFT_SHAP_FIELD_NUMBER: _ClassVar[int]
    LAYER_GRADIENT_SHAP_FIELD_NUMBER: _ClassVar[int]
    LAYER_FEATURE_ABLATION_FIELD_NUMBER: _ClassVar[int]
    LRP_FIELD_NUMBER: _ClassVar[int]
    LAYER_LRP_FIELD_NUMBER: _ClassVar[int]
    GUIDED_GRAD_CAM_FIELD_NUMBER: _ClassVar[int]
    NEURON_GRADIENT_FIELD_NUMBER: _ClassVar[int]
    NEURON_INTEGRATED_GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    NEURON_CONDUCTANCE_FIELD_NUMBER: _ClassVar[int]
    NEURON_DEEP_LIFT_FIELD_NUMBER: _ClassVar[int]
    NEURON_GRADIENT_SHAP_FIELD_NUMBER: _ClassVar[int]
    NEURON_DEEP_LIFT_SHAP_FIELD_NUMBER: _ClassVar[int]
    NEURON_GUIDED_BACKPROP_FIELD_NUMBER: _ClassVar[int]
    NEURON_DECONVOLUTION_FIELD_NUMBER: _ClassVar[int]
    NEURON_FEATURE_ABLATION_FIELD_NUMBER: _ClassVar[int]
    NOISE_TUNNEL_FIELD_NUMBER: _ClassVar[int]
    RETURN_CONVERGENCE_DELTA_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    FEATURE_MASKS_FIELD_NUMBER: _ClassVar[int]
    RETURN_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    CUSTOM_ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    CUSTOM_PARAMS_FIELD_NUMBER: _ClassVar[int]
    ALSO_FIELD_NUMBER: _ClassVar[int]
    EVALUATE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    model_version: str
    algorithm: Algorithm
    inputs: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    baselines: _containers.RepeatedCompositeFieldContainer[Baseline]
    target: Target
    additional_forward_args: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    layer: str
    integrated_gradients: IntegratedGradientsParams
    saliency: SaliencyParams
    deep_lift: DeepLiftParams
    gradient_shap: GradientShapParams
    feature_ablation: FeatureAblationParams
    feature_permutation: FeaturePermutationParams
    occlusion: OcclusionParams
    shapley_value_sampling: ShapleyValueSamplingParams
    shapley_values: ShapleyValuesParams
    lime: LimeParams
    kernel_shap: KernelShapParams
    deep_lift_shap: DeepLiftShapParams
    layer_integrated_gradients: LayerIntegratedGradientsParams
    layer_conductance: LayerConductanceParams
    internal_influence: InternalInfluenceParams
    layer_gradient_x_activation: LayerGradientXActivationParams
    layer_activation: LayerActivationParams
    layer_grad_cam: LayerGradCamParams
    layer_deep_lift: LayerDeepLiftParams
    layer_deep_lift_shap: LayerDeepLiftShapParams
    layer_gradient_shap: LayerGradientShapParams
    layer_feature_ablation: LayerFeatureAblationParams
    lrp: LRPParams
    layer_lrp: LayerLRPParams
    guided_grad_cam: GuidedGradCamParams
    neuron_gradient: NeuronGradientParams
    neuron_integrated_gradients: NeuronIntegratedGradientsParams
    neuron_conductance: NeuronConductanceParams
    neuron_deep_lift: NeuronDeepLiftParams
    neuron_gradient_shap: NeuronGradientShapParams
    neuron_deep_lift_shap: NeuronDeepLiftShapParams
    neuron_guided_backprop: NeuronGuidedBackpropParams
    neuron_deconvolution: NeuronDeconvolutionParams
    neuron_feature_ablation: NeuronFeatureAblationParams
    noise_tunnel: NoiseTunnel
    return_convergence_delta: bool
    seed: int
    feature_masks: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    return_outputs: bool
    custom_algorithm: str
    custom_params: _struct_pb2.Struct
    also: _containers.RepeatedCompositeFieldContainer[AlgorithmSpec]
    evaluate: Evaluate
    priority: Priority
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ..., algorithm: _Optional[_Union[Algorithm, str]] = ..., inputs: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ..., baselines: _Optional[_Iterable[_Union[Baseline, _Mapping]]] = ..., target: _Optional[_Union[Target, _Mapping]] = ..., additional_forward_args: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ..., layer: _Optional[str] = ..., integrated_gradients: _Optional[_Union[IntegratedGradientsParams, _Mapping]] = ..., saliency: _Optional[_Union[SaliencyParams, _Mapping]] = ..., deep_lift: _Optional[_Union[DeepLiftParams, _Mapping]] = ..., gradient_shap: _Optional[_Union[GradientShapParams, _Mapping]] = ..., feature_ablation: _Optional[_Union[FeatureAblationParams, _Mapping]] = ..., feature_permutation: _Optional[_Union[FeaturePermutationParams, _Mapping]] = ..., occlusion: _Optional[_Union[OcclusionParams, _Mapping]] = ..., shapley_value_sampling: _Optional[_Union[ShapleyValueSamplingParams, _Mapping]] = ..., shapley_values: _Optional[_Union[ShapleyValuesParams, _Mapping]] = ..., lime: _Optional[_Union[LimeParams, _Mapping]] = ..., kernel_shap: _Optional[_Union[KernelShapParams, _Mapping]] = ..., deep_lift_shap: _Optional[_Union[DeepLiftShapParams, _Mapping]] = ..., layer_integrated_gradients: _Optional[_Union[LayerIntegratedGradientsParams, _Mapping]] = ..., layer_conductance: _Optional[_Union[LayerConductanceParams, _Mapping]] = ..., internal_influence: _Optional[_Union[InternalInfluenceParams, _Mapping]] = ..., layer_gradient_x_activation: _Optional[_Union[LayerGradientXActivationParams, _Mapping]] = ..., layer_activation: _Optional[_Union[LayerActivationParams, _Mapping]] = ..., layer_grad_cam: _Optional[_Union[LayerGradCamParams, _Mapping]] = ..., layer_deep_lift: _Optional[_Union[LayerDeepLiftParams, _Mapping]] = ..., layer_deep_lift_shap: _Optional[_Union[LayerDeepLiftShapParams, _Mapping]] = ..., layer_gradient_shap: _Optional[_Union[LayerGradientShapParams, _Mapping]] = ..., layer_feature_ablation: _Optional[_Union[LayerFeatureAblationParams, _Mapping]] = ..., lrp: _Optional[_Union[LRPParams, _Mapping]] = ..., layer_lrp: _Optional[_Union[LayerLRPParams, _Mapping]] = ..., guided_grad_cam: _Optional[_Union[GuidedGradCamParams, _Mapping]] = ..., neuron_gradient: _Optional[_Union[NeuronGradientParams, _Mapping]] = ..., neuron_integrated_gradients: _Optional[_Union[NeuronIntegratedGradientsParams, _Mapping]] = ..., neuron_conductance: _Optional[_Union[NeuronConductanceParams, _Mapping]] = ..., neuron_deep_lift: _Optional[_Union[NeuronDeepLiftParams, _Mapping]] = ..., neuron_gradient_shap: _Optional[_Union[NeuronGradientShapParams, _Mapping]] = ..., neuron_deep_lift_shap: _Optional[_Union[NeuronDeepLiftShapParams, _Mapping]] = ..., neuron_guided_backprop: _Optional[_Union[NeuronGuidedBackpropParams, _Mapping]] = ..., neuron_deconvolution: _Optional[_Union[NeuronDeconvolutionParams, _Mapping]] = ..., neuron_feature_ablation: _Optional[_Union[NeuronFeatureAblationParams, _Mapping]] = ..., noise_tunnel: _Optional[_Union[NoiseTunnel, _Mapping]] = ..., return_convergence_delta: _Optional[bool] = ..., seed: _Optional[int] = ..., feature_masks: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ..., return_outputs: _Optional[bool] = ..., custom_algorithm: _Optional[str] = ..., custom_params: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., also: _Optional[_Iterable[_Union[AlgorithmSpec, _Mapping]]] = ..., evaluate: _Optional[_Union[Evaluate, _Mapping]] = ..., priority: _Optional[_Union[Priority, str]] = ...) -> None: ...

class Evaluate(_message.Message):
    __slots__ = ("infidelity", "sensitivity_max")
    INFIDELITY_FIELD_NUMBER: _ClassVar[int]
    SENSITIVITY_MAX_FIELD_NUMBER: _ClassVar[int]
    infidelity: Infidelity
    sensitivity_max: SensitivityMax
    def __init__(self, infidelity: _Optional[_Union[Infidelity, _Mapping]] = ..., sensitivity_max: _Optional[_Union[SensitivityMax, _Mapping]] = ...) -> None: ...

class Infidelity(_message.Message):
    __slots__ = ("n_perturb_samples", "noise_scale", "normalize")
    N_PERTURB_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    NOISE_SCALE_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    n_perturb_samples: int
    noise_scale: float
    normalize: bool
    def __init__(self, n_perturb_samples: _Optional[int] = ..., noise_scale: _Optional[float] = ..., normalize: _Optional[bool] = ...) -> None: ...

class SensitivityMax(_message.Message):
    __slots__ = ("perturb_radius", "n_perturb_samples")
    PERTURB_RADIUS_FIELD_NUMBER: _ClassVar[int]
    N_PERTURB_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    perturb_radius: float
    n_perturb_samples: int
    def __init__(self, perturb_radius: _Optional[float] = ..., n_perturb_samples: _Optional[int] = ...) -> None: ...

class AlgorithmSpec(_message.Message):
    __slots__ = ("algorithm", "custom_algorithm", "params", "noise_tunnel", "layer", "return_convergence_delta")
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    CUSTOM_ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    NOISE_TUNNEL_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    RETURN_CONVERGENCE_DELTA_FIELD_NUMBER: _ClassVar[int]
    algorithm: Algorithm
    custom_algorithm: str
    params: _struct_pb2.Struct
    noise_tunnel: NoiseTunnel
    layer: str
    return_convergence_delta: bool
    def __init__(self, algorithm: _Optional[_Union[Algorithm, str]] = ..., custom_algorithm: _Optional[str] = ..., params: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., noise_tunnel: _Optional[_Union[NoiseTunnel, _Mapping]] = ..., layer: _Optional[str] = ..., return_convergence_delta: _Optional[bool] = ...) -> None: ...

class AlgorithmResult(_message.Message):
    __slots__ = ("algorithm", "attributions", "convergence_delta")
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    CONVERGENCE_DELTA_FIELD_NUMBER: _ClassVar[int]
    algorithm: str
    attributions: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    convergence_delta: _tensor_pb2.Tensor
    def __init__(self, algorithm: _Optional[str] = ..., attributions: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ..., convergence_delta: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("queue_ms", "compute_ms", "total_ms", "rows", "passes", "pass_rows", "pass_requests")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    PASSES_FIELD_NUMBER: _ClassVar[int]
    PASS_ROWS_FIELD_NUMBER: _ClassVar[int]
    PASS_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    compute_ms: float
    total_ms: float
    rows: int
    passes: int
    pass_rows: int
    pass_requests: int
    def __init__(self, queue_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., rows: _Optional[int] = ..., passes: _Optional[int] = ..., pass_rows: _Optional[int] = ..., pass_requests: _Optional[int] = ...) -> None: ...

class AttributeResponse(_message.Message):
    __slots__ = ("request_id", "attributions", "convergence_delta", "outputs", "model_version", "timing", "seed", "also", "infidelity", "sensitivity_max", "input_casts")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    CONVERGENCE_DELTA_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    ALSO_FIELD_NUMBER: _ClassVar[int]
    INFIDELITY_FIELD_NUMBER: _ClassVar[int]
    SENSITIVITY_MAX_FIELD_NUMBER: _ClassVar[int]
    INPUT_CASTS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    attributions: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    convergence_delta: _tensor_pb2.Tensor
    outputs: _tensor_pb2.Tensor
    model_version: str
    timing: Timing
    seed: int
    also: _containers.RepeatedCompositeFieldContainer[AlgorithmResult]
    infidelity: _tensor_pb2.Tensor
    sensitivity_max: _tensor_pb2.Tensor
    input_casts: _containers.RepeatedCompositeFieldContainer[InputCast]
    def __init__(self, request_id: _Optional[str] = ..., attributions: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ..., convergence_delta: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., outputs: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., model_version: _Optional[str] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., seed: _Optional[int] = ..., also: _Optional[_Iterable[_Union[AlgorithmResult, _Mapping]]] = ..., infidelity: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., sensitivity_max: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., input_casts: _Optional[_Iterable[_Union[InputCast, _Mapping]]] = ...) -> None: ...

class InputCast(_message.Message):
    __slots__ = ("input", "sent", "used")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    SENT_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    input: int
    sent: _tensor_pb2.DataType
    used: _tensor_pb2.DataType
    def __init__(self, input: _Optional[int] = ..., sent: _Optional[_Union[_tensor_pb2.DataType, str]] = ..., used: _Optional[_Union[_tensor_pb2.DataType, str]] = ...) -> None: ...

class AttributeStreamRequest(_message.Message):
    __slots__ = ("request",)
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request: AttributeRequest
    def __init__(self, request: _Optional[_Union[AttributeRequest, _Mapping]] = ...) -> None: ...

class RequestError(_message.Message):
    __slots__ = ("code", "message", "retry_after_ms")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    retry_after_ms: int
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., retry_after_ms: _Optional[int] = ...) -> None: ...

class AttributeStreamResponse(_message.Message):
    __slots__ = ("request_id", "response", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    response: AttributeResponse
    error: RequestError
    def __init__(self, request_id: _Optional[str] = ..., response: _Optional[_Union[AttributeResponse, _Mapping]] = ..., error: _Optional[_Union[RequestError, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model", "model_version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class GetModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelInfo
    def __init__(self, model: _Optional[_Union[ModelInfo, _Mapping]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("config", "layers", "algorithms", "ready", "custom_algorithms", "batch_probe", "state", "reason", "refused")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    ALGORITHMS_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    CUSTOM_ALGORITHMS_FIELD_NUMBER: _ClassVar[int]
    BATCH_PROBE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    config: _model_config_pb2.ModelConfig
    layers: _containers.RepeatedScalarFieldContainer[str]
    algorithms: _containers.RepeatedScalarFieldContainer[Algorithm]
    ready: bool
    custom_algorithms: _containers.RepeatedScalarFieldContainer[str]
    batch_probe: _containers.RepeatedCompositeFieldContainer[BatchProbe]
    state: ModelState
    reason: str
    refused: _containers.RepeatedCompositeFieldContainer[RefusedAlgorithm]
    def __init__(self, config: _Optional[_Union[_model_config_pb2.ModelConfig, _Mapping]] = ..., layers: _Optional[_Iterable[str]] = ..., algorithms: _Optional[_Iterable[_Union[Algorithm, str]]] = ..., ready: _Optional[bool] = ..., custom_algorithms: _Optional[_Iterable[str]] = ..., batch_probe: _Optional[_Iterable[_Union[BatchProbe, _Mapping]]] = ..., state: _Optional[_Union[ModelState, str]] = ..., reason: _Optional[str] = ..., refused: _Optional[_Iterable[_Union[RefusedAlgorithm, _Mapping]]] = ...) -> None: ...

class RefusedAlgorithm(_message.Message):
    __slots__ = ("name", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    reason: str
    def __init__(self, name: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ("model", "version", "state", "reason")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    state: ModelState
    reason: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., state: _Optional[_Union[ModelState, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class RepositoryIndexRequest(_message.Message):
    __slots__ = ("ready_only",)
    READY_ONLY_FIELD_NUMBER: _ClassVar[int]
    ready_only: bool
    def __init__(self, ready_only: _Optional[bool] = ...) -> None: ...

class RepositoryIndexResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelStatus]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelStatus, _Mapping]]] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class LoadModelResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelStatus]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelStatus, _Mapping]]] = ...) -> None: ...

class UnloadModelRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class UnloadModelResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelStatus]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelStatus, _Mapping]]] = ...) -> None: ...

class BatchProbe(_message.Message):
    __slots__ = ("rows", "rows_per_second")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    ROWS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    rows: int
    rows_per_second: float
    def __init__(self, rows: _Optional[int] = ..., rows_per_second: _Optional[float] = ...) -> None: ...
