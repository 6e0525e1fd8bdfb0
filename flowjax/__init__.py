"""flowjax: the flow model of neural networks in JAX.

A plain net is a flow (rotate, stretch, rotate, translate, activate); a ResNet is
Euler's method on a flow. See docs/theory.md for the equations cited throughout.
"""

from ._activations import (
    Activation as Activation,
    activation as activation,
    activation_velocity as activation_velocity,
    homotopy_threshold as homotopy_threshold,
    inverse_below_threshold as inverse_below_threshold,
    piecewise_linear as piecewise_linear,
    sigma_s as sigma_s,
    sigma_s_inverse as sigma_s_inverse,
)
from ._certificate import (
    Certificate as Certificate,
    certify as certify,
    fitted_order as fitted_order,
)
from ._classifier import FlowCoordinateMLP as FlowCoordinateMLP, FlowNet as FlowNet
from ._fields import (
    activation_field as activation_field,
    affine_stage_field as affine_stage_field,
    layer_field as layer_field,
    linear_stage_generators as linear_stage_generators,
    network_field as network_field,
    rotation_field as rotation_field,
    stretch_field as stretch_field,
    translation_field as translation_field,
)
from ._flow_model import FlowModel as FlowModel, flow_model as flow_model
from ._flow_params import (
    LayerFlow as LayerFlow,
    NetworkFlow as NetworkFlow,
    flow_parameters as flow_parameters,
)
from ._linalg import (
    embed_layer as embed_layer,
    embedding_dim as embedding_dim,
    layer_generators as layer_generators,
    layer_svd as layer_svd,
    proper_svd as proper_svd,
    skew_log as skew_log,
    stretch_generator as stretch_generator,
)
from ._neural_flow import (
    NeuralFlow as NeuralFlow,
    flow_to_resnet as flow_to_resnet,
    resnet_to_flow as resnet_to_flow,
)
from ._plain_net import (
    PlainLayer as PlainLayer,
    PlainNet as PlainNet,
    plain_net as plain_net,
)
from ._refine import (
    RefinedNet as RefinedNet,
    refine as refine,
    refinement_error as refinement_error,
)
from ._resnet import (
    AbstractBlock as AbstractBlock,
    AbstractStage as AbstractStage,
    ActivationBlock as ActivationBlock,
    Chain as Chain,
    DiagonalBlock as DiagonalBlock,
    EulerResNet as EulerResNet,
    LinearBlock as LinearBlock,
    LinearMap as LinearMap,
    LinearStage as LinearStage,
    Stage as Stage,
    StretchStage as StretchStage,
    TranslationBlock as TranslationBlock,
    TranslationStage as TranslationStage,
    TwoLayerBlock as TwoLayerBlock,
    homotopy_weights as homotopy_weights,
    parameter_count as parameter_count,
    storage_bytes as storage_bytes,
)
from ._serialise import (
    load_model as load_model,
    read_header as read_header,
    save_mlp as save_mlp,
    save_refined as save_refined,
)
from ._sharding import (
    add_distributed_flag as add_distributed_flag,
    as_mesh as as_mesh,
    cast_tree as cast_tree,
    evaluate_sharded as evaluate_sharded,
    make_mesh as make_mesh,
    maybe_initialize_distributed as maybe_initialize_distributed,
    param_spec as param_spec,
    refine_many as refine_many,
)
from ._time_scaling import TimeScaling as TimeScaling, time_scaling as time_scaling
from ._training import (
    FitResult as FitResult,
    History as History,
    TrainingDivergedError as TrainingDivergedError,
    accuracy as accuracy,
    evaluate as evaluate,
    fit as fit,
    load_checkpoint as load_checkpoint,
    mean_squared_error as mean_squared_error,
    save_checkpoint as save_checkpoint,
    softmax_cross_entropy as softmax_cross_entropy,
)
from ._transport import (
    Integrator as Integrator,
    characteristics as characteristics,
    flow_map as flow_map,
    solve_transport as solve_transport,
)
from ._two_layer import (
    GridParams as GridParams,
    TwoLayerField as TwoLayerField,
    TwoLayerParams as TwoLayerParams,
    two_layer_velocity as two_layer_velocity,
    uniform_grid as uniform_grid,
)


__version__ = "0.1.0"
