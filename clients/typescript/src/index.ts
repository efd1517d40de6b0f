/**
 * A small Node client for attrserve's AttributionService: plain numbers or typed arrays in, typed arrays out,
 * Captum's argument names. The messages and the raw grpc-js clients are generated into ./gen by generate.sh and
 * re-exported as `pb`.
 */
import { endianness } from "node:os";

import * as grpc from "@grpc/grpc-js";

import * as pb from "./gen/attrserve/v1/attribution_service";
import { DataType, type Tensor as TensorMessage } from "./gen/attrserve/v1/tensor";

export { pb, DataType };

/** Element types, as the wire's DataType names them (DATA_TYPE_FLOAT32 → "float32"). */
export type DType = "float32" | "float64" | "float16" | "bfloat16" | "int64" | "int32" | "int16" | "int8" | "uint8" | "bool";

export type TypedArray =
  | Float32Array
  | Float64Array
  | BigInt64Array
  | Int32Array
  | Int16Array
  | Int8Array
  | Uint8Array
  | Uint16Array;

/** A dense tensor: `data` holds prod(shape) elements in row-major order. */
export interface Tensor<T extends TypedArray = TypedArray> {
  data: T;
  shape: number[];
  dtype: DType;
}

/**
 * A tensor to send: a typed array (or a flat number array) with its shape. `dtype` defaults to the typed array's
 * (Float32Array → float32, BigInt64Array → int64, Int32Array → int32, ...; a number array → float32). Uint8Array
 * is uint8 unless dtype says "bool"; float16 and bfloat16 are sent as a Uint16Array of their bits.
 */
export interface TensorInput {
  data: TypedArray | readonly number[];
  shape: readonly number[];
  dtype?: DType;
}

/** Plain numbers in nested arrays (every row the same length): float32, as torch.tensor makes of floats. */
export type NestedNumbers = number | readonly NestedNumbers[];

/** One tensor argument: nested numbers or a TensorInput. */
export type TensorLike = NestedNumbers | TensorInput;

/**
 * Which output to explain, as Captum's `target`: one index for every example, one per example (`[0, 1]`), one
 * tuple per example (`[[0, 1], [1, 0]]`), or one tuple for every example (`{ tuple: [0, 1] }`).
 */
export type TargetLike = number | readonly number[] | readonly (readonly number[])[] | { tuple: readonly number[] };

/** Captum-named parameters, e.g. `{ n_steps: 32, method: "riemann_trapezoid" }`. */
export type Params = Record<string, unknown>;

export interface AttributeOptions {
  /** Captum's `target`. */
  target?: TargetLike;
  /** One baseline for every input: a number, or a tensor broadcastable to the input; an array of them (one per input) for multi-input models. */
  baselines?: number | TensorLike | readonly (number | TensorInput | null)[];
  /** The algorithm's parameters by Captum's names (a plugin's go in custom_params). */
  params?: Params;
  /** Dotted module path, for layer and neuron methods. */
  layer?: string;
  /** Seed of the request's generators (the server picks one when unset and returns it). */
  seed?: number | bigint;
  returnConvergenceDelta?: boolean;
  returnOutputs?: boolean;
  /** NoiseTunnel around the algorithm: `{ nt_type: "smoothgrad", nt_samples: 5, stdevs: 0.1 }`. */
  noiseTunnel?: Params;
  /** Extra tensors passed to forward after the inputs. */
  additionalForwardArgs?: readonly TensorLike[];
  /** One per input, for perturbation methods (one input: the mask itself). */
  featureMask?: TensorLike | readonly TensorInput[];
  modelVersion?: string;
  requestId?: string;
  priority?: "interactive" | "batch";
  /** Deadline of the call in milliseconds from now. */
  deadline?: number;
}

export interface Timing {
  queueMs: number;
  computeMs: number;
  totalMs: number;
  rows: number;
  passes: number;
  passRows: number;
  passRequests: number;
}

export interface Attribution<A = Tensor> {
  /** Shaped like the input (one per input, in order, for a multi-input request). */
  attributions: A;
  convergenceDelta?: Tensor;
  outputs?: Tensor;
  modelVersion: string;
  /** The seed the request's generators used (a uint64). */
  seed: bigint;
  timing: Timing;
  requestId: string;
  /** [input index, dtype sent, dtype computed in] for each input the server cast to the model's pinned dtype. */
  inputCasts: [number, DType, DType][];
}

/** A served model, with its algorithms by name as well. */
export interface ModelDescription extends pb.ModelInfo {
  algorithmNames: string[];
}

export interface ClientOptions {
  /** Default: plaintext (grpc.credentials.createInsecure()); grpc.credentials.createSsl(...) for TLS. */
  credentials?: grpc.ChannelCredentials;
  /** Sent as `authorization: Bearer <token>` on every call. */
  token?: string;
  /** grpc-js channel options, merged over the defaults (no message size limits on the client side). */
  channelOptions?: grpc.ChannelOptions;
}

/** A failed call: the gRPC status code (grpc.status, e.g. 3 = INVALID_ARGUMENT) and the server's message. */
export class AttrserveError extends Error {
  readonly code: grpc.status;
  /** The status code's name, e.g. "INVALID_ARGUMENT". */
  readonly codeName: string;
  /** The message alone, without the code. */
  readonly details: string;
  readonly metadata?: grpc.Metadata;

  constructor(code: grpc.status, details: string, metadata?: grpc.Metadata) {
    const codeName = grpc.status[code] ?? String(code);
    super(`${codeName}: ${details}`);
    this.name = "AttrserveError";
    this.code = code;
    this.codeName = codeName;
    this.details = details;
    this.metadata = metadata;
  }
}

/** A request the client refuses to send: INVALID_ARGUMENT, as the server would answer. */
function invalid(details: string): AttrserveError {
  return new AttrserveError(grpc.status.INVALID_ARGUMENT, details);
}

// -- tensors ----------------------------------------------------------------------------------------------

const WIRE: Record<DType, DataType> = {
  float32: DataType.DATA_TYPE_FLOAT32,
  float64: DataType.DATA_TYPE_FLOAT64,
  float16: DataType.DATA_TYPE_FLOAT16,
  bfloat16: DataType.DATA_TYPE_BFLOAT16,
  int64: DataType.DATA_TYPE_INT64,
  int32: DataType.DATA_TYPE_INT32,
  int16: DataType.DATA_TYPE_INT16,
  int8: DataType.DATA_TYPE_INT8,
  uint8: DataType.DATA_TYPE_UINT8,
  bool: DataType.DATA_TYPE_BOOL,
};
const DTYPE_OF = new Map<DataType, DType>(Object.entries(WIRE).map(([k, v]) => [v, k as DType]));
const ITEMSIZE: Record<DType, number> = {
  float32: 4,
  float64: 8,
  float16: 2,
  bfloat16: 2,
  int64: 8,
  int32: 4,
  int16: 2,
  int8: 1,
  uint8: 1,
  bool: 1,
};
const LITTLE_ENDIAN = endianness() === "LE";

/** The dtype name of a wire DataType (DATA_TYPE_FLOAT64 → "float64"). */
export function dtypeName(dtype: DataType): DType {
  const name = DTYPE_OF.get(dtype);
  if (name === undefined) throw invalid(`unsupported tensor dtype ${dtype}`);
  return name;
}

function typedArrayDtype(data: TypedArray | readonly number[]): DType {
  if (data instanceof Float32Array) return "float32";
  if (data instanceof Float64Array) return "float64";
  if (data instanceof BigInt64Array) return "int64";
  if (data instanceof Int32Array) return "int32";
  if (data instanceof Int16Array) return "int16";
  if (data instanceof Int8Array) return "int8";
  if (data instanceof Uint8Array) return "uint8";
  if (data instanceof Uint16Array) throw invalid("a Uint16Array holds float16 or bfloat16 bits: give dtype");
  return "float32";
}

/** Copies `values` into a fresh typed array of `dtype` (for number arrays and typed arrays of another type). */
function castTo(values: ArrayLike<number | bigint>, dtype: DType, label: string): TypedArray {
  const n = values.length;
  switch (dtype) {
    case "float32":
      return Float32Array.from(values as ArrayLike<number>, (v, i) => num(v, label, i));
    case "float64":
      return Float64Array.from(values as ArrayLike<number>, (v, i) => num(v, label, i));
    case "int64": {
      const out = new BigInt64Array(n);
      for (let i = 0; i < n; i++) out[i] = intOf(values[i], dtype, `${label}[${i}]`);
      return out;
    }
    case "int32":
      return Int32Array.from(values as ArrayLike<number>, (v, i) => Number(intOf(v, dtype, `${label}[${i}]`)));
    case "int16":
      return Int16Array.from(values as ArrayLike<number>, (v, i) => Number(intOf(v, dtype, `${label}[${i}]`)));
    case "int8":
      return Int8Array.from(values as ArrayLike<number>, (v, i) => Number(intOf(v, dtype, `${label}[${i}]`)));
    case "uint8":
      return Uint8Array.from(values as ArrayLike<number>, (v, i) => Number(intOf(v, dtype, `${label}[${i}]`)));
    case "bool":
      return Uint8Array.from(values as ArrayLike<number>, (v) => (v ? 1 : 0));
    case "float16":
    case "bfloat16":
      if (values instanceof Uint16Array) return values;
      throw invalid(`${label}: ${dtype} data must be a Uint16Array of its bits`);
  }
}

function num(v: unknown, label: string, i: number): number {
  if (typeof v === "bigint") return Number(v);
  if (typeof v !== "number" && typeof v !== "boolean") throw invalid(`${label}[${i}]: expected a number, got ${shown(v)}`);
  return Number(v);
}

function integer(v: unknown, label: string): bigint {
  if (typeof v === "bigint") return v;
  if (typeof v === "number" && Number.isInteger(v)) return BigInt(v);
  if (typeof v === "boolean") return v ? 1n : 0n;
  throw invalid(`${label}: expected an integer, got ${shown(v)}`);
}

// What each integer dtype holds: a typed array (and the wire's int64) would wrap a value outside it silently.
const RANGE: Partial<Record<DType, [bigint, bigint]>> = {
  int64: [-(1n << 63n), (1n << 63n) - 1n],
  int32: [-(1n << 31n), (1n << 31n) - 1n],
  int16: [-(1n << 15n), (1n << 15n) - 1n],
  int8: [-128n, 127n],
  uint8: [0n, 255n],
};

/** `v` as an integer that `dtype` (an integer dtype) holds; else INVALID_ARGUMENT naming `label`. */
function intOf(v: unknown, dtype: DType, label: string): bigint {
  const value = integer(v, label);
  const [low, high] = RANGE[dtype] as [bigint, bigint];
  if (value < low || value > high) {
    const text = String(value);
    throw invalid(`${label}: ${text.length <= 40 ? text : `${text.slice(0, 40)}...`} is outside ${dtype}'s range [${low}, ${high}]`);
  }
  return value;
}

function shown(v: unknown): string {
  let text: string;
  try {
    text = typeof v === "bigint" ? `${v}n` : (JSON.stringify(v) ?? String(v));
  } catch {
    text = String(v);
  }
  return text.length <= 60 ? text : `${text.slice(0, 60)}...`;
}

function isTensorInput(v: unknown): v is TensorInput {
  return typeof v === "object" && v !== null && !Array.isArray(v) && "data" in v && "shape" in v;
}

/** Flattens nested numbers (or booleans) into values and a shape; every row must have the same length. */
function flatten(value: unknown, label: string): { values: (number | boolean)[]; shape: number[] } {
  const shape: number[] = [];
  for (let v = value; Array.isArray(v); v = v[0]) shape.push(v.length);
  const values: (number | boolean)[] = [];
  const walk = (v: unknown, depth: number, where: string): void => {
    if (depth === shape.length) {
      if (typeof v !== "number" && typeof v !== "boolean") throw invalid(`${label}${where}: expected a number, got ${shown(v)}`);
      values.push(v);
      return;
    }
    if (!Array.isArray(v) || v.length !== shape[depth]) {
      throw invalid(`${label}${where}: ragged nested arrays (expected ${shape[depth]} entries at depth ${depth})`);
    }
    v.forEach((item, i) => walk(item, depth + 1, `${where}[${i}]`));
  };
  walk(value, 0, "");
  return { values, shape };
}

function bytesOf(data: TypedArray, itemsize: number): Buffer {
  const bytes = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  if (LITTLE_ENDIAN || itemsize === 1) return Buffer.from(bytes); // a copy: the message owns its bytes
  const out = Buffer.alloc(bytes.length);
  for (let i = 0; i < bytes.length; i += itemsize) for (let j = 0; j < itemsize; j++) out[i + j] = bytes[i + itemsize - 1 - j];
  return out;
}

/** Encodes nested numbers or a TensorInput as the wire Tensor (raw little-endian bytes, row-major). */
export function toTensorMessage(value: TensorLike, label = "tensor"): TensorMessage {
  let data: TypedArray;
  let shape: number[];
  let dtype: DType;
  if (isTensorInput(value)) {
    shape = Array.from(value.shape, (d, i) => {
      if (!Number.isSafeInteger(d) || d < 0) throw invalid(`${label}.shape[${i}]: expected a non-negative integer, got ${shown(d)}`);
      return d;
    });
    dtype = value.dtype ?? typedArrayDtype(value.data);
    if (!(dtype in WIRE)) throw invalid(`${label}.dtype: unknown dtype ${shown(dtype)}; valid: ${Object.keys(WIRE).join(", ")}`);
    const same = !Array.isArray(value.data) && typedArrayDtype(value.data as TypedArray) === dtype;
    data = same ? (value.data as TypedArray) : castTo(value.data as ArrayLike<number>, dtype, `${label}.data`);
    const count = shape.reduce((a, b) => a * b, 1);
    if (data.length !== count) throw invalid(`${label}: data has ${data.length} elements but shape [${shape.join(", ")}] needs ${count}`);
  } else {
    const flat = flatten(value, label);
    shape = flat.shape;
    const bools = flat.values.length > 0 && flat.values.every((v) => typeof v === "boolean");
    dtype = bools ? "bool" : "float32";
    data = castTo(flat.values as number[], dtype, label);
  }
  return { dtype: WIRE[dtype], shape: shape.map(BigInt), data: bytesOf(data, ITEMSIZE[dtype]) };
}

function halfToFloat(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const frac = h & 0x3ff;
  if (exp === 0) return sign * 2 ** -14 * (frac / 1024);
  if (exp === 0x1f) return frac ? NaN : sign * Infinity;
  return sign * 2 ** (exp - 15) * (1 + frac / 1024);
}

/** Decodes a wire Tensor into a typed array: float16 and bfloat16 widen to Float32Array, bool is a Uint8Array of 0/1. */
export function fromTensorMessage(message: TensorMessage): Tensor {
  const dtype = dtypeName(message.dtype);
  const shape = message.shape.map((d) => {
    if (d < 0n) throw invalid(`tensor shape [${message.shape.join(", ")}] has a negative dimension`);
    return Number(d);
  });
  const count = shape.reduce((a, b) => a * b, 1);
  const itemsize = ITEMSIZE[dtype];
  if (message.data.length !== count * itemsize) {
    throw invalid(`tensor data has ${message.data.length} bytes but shape [${shape.join(", ")}] of ${dtype} needs ${count * itemsize}`);
  }
  const view = new DataView(message.data.buffer, message.data.byteOffset, message.data.byteLength);
  const read = <T extends TypedArray>(out: T, get: (offset: number) => number | bigint): T => {
    for (let i = 0; i < count; i++) (out as unknown as (number | bigint)[])[i] = get(i * itemsize);
    return out;
  };
  let data: TypedArray;
  switch (dtype) {
    case "float32":
      data = read(new Float32Array(count), (o) => view.getFloat32(o, true));
      break;
    case "float64":
      data = read(new Float64Array(count), (o) => view.getFloat64(o, true));
      break;
    case "float16":
      data = read(new Float32Array(count), (o) => halfToFloat(view.getUint16(o, true)));
      break;
    case "bfloat16": {
      const bits = new DataView(new ArrayBuffer(4));
      data = read(new Float32Array(count), (o) => {
        bits.setUint32(0, view.getUint16(o, true) << 16);
        return bits.getFloat32(0);
      });
      break;
    }
    case "int64":
      data = read(new BigInt64Array(count), (o) => view.getBigInt64(o, true));
      break;
    case "int32":
      data = read(new Int32Array(count), (o) => view.getInt32(o, true));
      break;
    case "int16":
      data = read(new Int16Array(count), (o) => view.getInt16(o, true));
      break;
    case "int8":
      data = read(new Int8Array(count), (o) => view.getInt8(o));
      break;
    case "uint8":
    case "bool":
      data = read(new Uint8Array(count), (o) => view.getUint8(o));
      break;
  }
  const decoded = dtype === "float16" || dtype === "bfloat16" ? "float32" : dtype;
  return { data, shape, dtype: decoded };
}

/** A tensor as nested number arrays, like numpy's tolist() (int64 values become numbers). */
export function toNested(tensor: Tensor): NestedNumbers {
  const values = Array.from(tensor.data as ArrayLike<number | bigint>, Number);
  if (tensor.shape.length === 0) return values[0];
  const build = (dim: number, offset: number, stride: number): NestedNumbers[] => {
    const size = tensor.shape[dim];
    const inner = stride / Math.max(size, 1);
    return Array.from({ length: size }, (_, i) =>
      dim === tensor.shape.length - 1 ? values[offset + i] : build(dim + 1, offset + i * inner, inner),
    );
  };
  return build(0, 0, values.length);
}

// -- requests ---------------------------------------------------------------------------------------------

const PREFIX = "ALGORITHM_";

/** The snake_case name of an Algorithm value (its number when this client's proto predates it). */
export function algorithmName(value: pb.Algorithm): string {
  const key = pb.Algorithm[value];
  return typeof key === "string" && key.startsWith(PREFIX) ? key.slice(PREFIX.length).toLowerCase() : String(value);
}

/** The built-in algorithm names this client knows, in snake_case. */
export function algorithmNames(): string[] {
  return Object.values(pb.Algorithm)
    .filter((v): v is pb.Algorithm => typeof v === "number" && v > 0)
    .map(algorithmName);
}

const snakeToCamel = (s: string): string => s.replace(/_([a-z0-9])/g, (_, c: string) => c.toUpperCase());
const camelToSnake = (s: string): string => s.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`);

interface MessageCodec<T> {
  create(base?: unknown): T;
  fromJSON(object: unknown): T;
  encode(message: T): { finish(): Uint8Array };
}

/**
 * A params-like message from Captum-named values: unknown names are refused with the valid ones, a scalar for a
 * repeated field is a list of one (stdevs: 0.1), a flat list for a list of IntLists is one input's
 * (sliding_window_shapes: [3, 4, 4]), null or undefined keeps the server's default. Captum's strides also take, per
 * input, an int for its every dim, so a flat list of strides is one int per input where there are `nInputs` > 1
 * (strides: [2, 1] for two inputs; [1, [2, 2]]).
 */
function fillMessage<T extends object>(codec: MessageCodec<T>, values: Params, what: string, label: string, nInputs = 1): T {
  if (typeof values !== "object" || values === null || Array.isArray(values)) {
    throw invalid(`${label}: expected an object of field values, got ${shown(values)}`);
  }
  const base = codec.create() as Record<string, unknown>;
  const fields = Object.keys(base).map(camelToSnake);
  const unknown = Object.keys(values).filter((k) => !fields.includes(k)).sort();
  if (unknown.length > 0) throw invalid(`unknown ${what} ${unknown.join(", ")}; valid: ${fields.join(", ") || "none"}`);
  const json: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(values)) {
    if (value === null || value === undefined) continue;
    const name = `${label}.${key}`;
    const initial = base[snakeToCamel(key)];
    if (Array.isArray(initial)) {
      const list: unknown[] = Array.isArray(value) ? value : [value];
      if (key === "sliding_window_shapes" || key === "strides") {
        const ints = key === "strides";
        const isInt = (v: unknown): boolean => typeof v === "number" || typeof v === "bigint";
        const lists = list.every(isInt) && !(ints && nInputs > 1) ? [list] : list;
        json[key] = lists.map((item, i) => {
          const values: unknown = ints && isInt(item) ? [item] : item; // an IntList of one value: an int stride
          if (!Array.isArray(values)) throw invalid(`${name}[${i}]: expected a list of integers, got ${shown(item)}`);
          return { values: values.map((v, j) => integer(v, `${name}[${i}][${j}]`).toString()) };
        });
      } else {
        list.forEach((v, i) => {
          if (typeof v !== "number" && typeof v !== "bigint") throw invalid(`${name}[${i}]: expected a number, got ${shown(v)}`);
        });
        json[key] = list.map((v) => (typeof v === "bigint" ? v.toString() : v));
      }
    } else {
      const expected = typeof initial === "string" || typeof initial === "boolean" ? typeof initial : undefined;
      if (expected !== undefined && typeof value !== expected) throw invalid(`${name}: expected a ${expected}, got ${shown(value)}`);
      if (!["number", "boolean", "string"].includes(typeof value)) throw invalid(`${name}: expected a number, bool or string, got ${shown(value)}`);
      json[key] = value;
    }
  }
  const message = codec.fromJSON(json) as Record<string, unknown>;
  for (const [key, value] of Object.entries(json)) {
    const got = message[snakeToCamel(key)];
    if (typeof value !== "object" && typeof got !== typeof value) {
      throw invalid(`${label}.${key}: expected a ${typeof got}, got ${shown(value)}`);
    }
    try {
      codec.encode(codec.fromJSON({ [key]: value })).finish();
    } catch (e) {
      // A value its field's type cannot hold (1.5 or 2^40 for a uint32): grpc-js would fail the call with INTERNAL.
      throw invalid(`${label}.${key}: ${shown(values[key])} does not fit the field (${e instanceof Error ? e.message : String(e)})`);
    }
  }
  return message as T;
}

// The params oneof of AttributeRequest: snake_case algorithm name → its message.
const PARAMS: Record<string, MessageCodec<object>> = {
  integrated_gradients: pb.IntegratedGradientsParams,
  saliency: pb.SaliencyParams,
  deep_lift: pb.DeepLiftParams,
  gradient_shap: pb.GradientShapParams,
  feature_ablation: pb.FeatureAblationParams,
  feature_permutation: pb.FeaturePermutationParams,
  occlusion: pb.OcclusionParams,
  shapley_value_sampling: pb.ShapleyValueSamplingParams,
  shapley_values: pb.ShapleyValuesParams,
  lime: pb.LimeParams,
  kernel_shap: pb.KernelShapParams,
  deep_lift_shap: pb.DeepLiftShapParams,
  layer_integrated_gradients: pb.LayerIntegratedGradientsParams,
  layer_conductance: pb.LayerConductanceParams,
  internal_influence: pb.InternalInfluenceParams,
  layer_gradient_x_activation: pb.LayerGradientXActivationParams,
  layer_activation: pb.LayerActivationParams,
  layer_grad_cam: pb.LayerGradCamParams,
  layer_deep_lift: pb.LayerDeepLiftParams,
  layer_deep_lift_shap: pb.LayerDeepLiftShapParams,
  layer_gradient_shap: pb.LayerGradientShapParams,
  layer_feature_ablation: pb.LayerFeatureAblationParams,
  lrp: pb.LRPParams,
  layer_lrp: pb.LayerLRPParams,
  guided_grad_cam: pb.GuidedGradCamParams,
  neuron_gradient: pb.NeuronGradientParams,
  neuron_integrated_gradients: pb.NeuronIntegratedGradientsParams,
  neuron_conductance: pb.NeuronConductanceParams,
  neuron_deep_lift: pb.NeuronDeepLiftParams,
  neuron_gradient_shap: pb.NeuronGradientShapParams,
  neuron_deep_lift_shap: pb.NeuronDeepLiftShapParams,
  neuron_guided_backprop: pb.NeuronGuidedBackpropParams,
  neuron_deconvolution: pb.NeuronDeconvolutionParams,
  neuron_feature_ablation: pb.NeuronFeatureAblationParams,
};

function targetIndex(value: number | readonly number[], label: string): pb.TargetIndex {
  const items = typeof value === "number" ? [value] : value;
  if (!Array.isArray(items)) throw invalid(`${label}: expected an integer or a list of integers, got ${shown(value)}`);
  return { index: items.map((v, i) => intOf(v, "int64", `${label}[${i}]`)) };
}

function target(value: TargetLike): pb.Target {
  if (typeof value === "number" || typeof value === "bigint") return { index: intOf(value, "int64", "target") };
  if (Array.isArray(value)) {
    return { perExample: { indices: value.map((t: number | readonly number[], i) => targetIndex(t, `target[${i}]`)) } };
  }
  if (typeof value === "object" && value !== null && "tuple" in value) return { tuple: targetIndex(value.tuple, "target.tuple") };
  throw invalid(`target must be an integer, a list with one per example or { tuple: [...] }; got ${shown(value)}`);
}

/** One entry per model input: an array of TensorInputs is one per input (as Python's tuple); anything else is one. */
function isMulti(value: unknown): value is readonly TensorInput[] {
  return Array.isArray(value) && value.length > 0 && value.every(isTensorInput);
}

function entries(value: TensorLike | readonly TensorInput[], label: string, n?: number): TensorLike[] {
  const list: TensorLike[] = isMulti(value) ? [...value] : [value as TensorLike];
  if (n !== undefined && list.length !== n) throw invalid(`${label} has ${list.length} entries for ${n} inputs`);
  return list;
}

function baselines(value: AttributeOptions["baselines"], nInputs: number): pb.Baseline[] {
  if (value === undefined || value === null) return [];
  if (typeof value === "number") return Array.from({ length: nInputs }, () => ({ scalar: value }));
  // A list of numbers (no tensor) is one nested-number baseline for a single input, or one scalar per input.
  const many = Array.isArray(value) && value.some((v) => isTensorInput(v) || v === null);
  const scalars = Array.isArray(value) && nInputs > 1 && value.length === nInputs && value.every((v) => typeof v === "number");
  const list = (many || scalars ? value : [value]) as (number | TensorLike | null)[];
  if (list.length !== nInputs) throw invalid(`baselines has ${list.length} entries for ${nInputs} inputs`);
  if (list.every((b) => b === null)) return [];
  return list.map((b, i) =>
    b === null ? {} : typeof b === "number" ? { scalar: b } : { tensor: toTensorMessage(b, `baselines[${i}]`) },
  );
}

/** Builds an AttributeRequest from Captum-style arguments (what AttrserveClient.attribute sends). */
export function buildRequest(model: string, algorithm: string, inputs: TensorLike | readonly TensorInput[], options: AttributeOptions = {}): pb.AttributeRequest {
  if (typeof model !== "string" || model === "") throw invalid(`model: expected a model name, got ${shown(model)}`);
  const key = PREFIX + String(algorithm).toUpperCase();
  const known = key !== "ALGORITHM_UNSPECIFIED" && key in pb.Algorithm;
  if (!known && !/^[a-z][a-z0-9_]*$/.test(String(algorithm))) {
    throw invalid(`unknown algorithm ${shown(algorithm)}; valid: ${algorithmNames().join(", ")}, or a plugin's snake_case name`);
  }
  const tensors = entries(inputs, "inputs").map((x, i) => toTensorMessage(x, `inputs[${i}]`));
  const request = pb.AttributeRequest.create({
    requestId: options.requestId ?? "",
    model,
    modelVersion: options.modelVersion ?? "",
    algorithm: known ? (pb.Algorithm[key as keyof typeof pb.Algorithm] as pb.Algorithm) : pb.Algorithm.ALGORITHM_UNSPECIFIED,
    customAlgorithm: known ? "" : algorithm,
    inputs: tensors,
    baselines: baselines(options.baselines, tensors.length),
    layer: options.layer ?? "",
    returnConvergenceDelta: options.returnConvergenceDelta ?? false,
    returnOutputs: options.returnOutputs ?? false,
  });
  if (options.target !== undefined && options.target !== null) request.target = target(options.target);
  if (options.additionalForwardArgs !== undefined) {
    request.additionalForwardArgs = options.additionalForwardArgs.map((a, i) => toTensorMessage(a, `additionalForwardArgs[${i}]`));
  }
  if (options.featureMask !== undefined) {
    request.featureMasks = entries(options.featureMask, "featureMask", tensors.length).map((m, i) =>
      toTensorMessage(m, `featureMask[${i}]`),
    );
  }
  const params = options.params;
  if (params !== undefined && params !== null && Object.keys(params).length > 0) {
    if (!known) {
      for (const [key, value] of Object.entries(params)) {
        try {
          pb.AttributeRequest.encode(pb.AttributeRequest.create({ customParams: { [key]: value } })).finish();
        } catch (e) {
          // A bigint, a function or a symbol has no google.protobuf.Value: grpc-js would fail the call with INTERNAL.
          throw invalid(`params.${key}: ${shown(value)} cannot be sent as JSON-like parameters (${e instanceof Error ? e.message : String(e)})`);
        }
      }
      request.customParams = params;
    } else {
      const codec = PARAMS[algorithm];
      if (codec === undefined) throw invalid(`algorithm ${shown(algorithm)} takes no params`);
      (request as unknown as Record<string, unknown>)[snakeToCamel(algorithm)] = fillMessage(codec, params, `${algorithm} params`, "params", tensors.length);
    }
  }
  if (options.noiseTunnel !== undefined) request.noiseTunnel = fillMessage(pb.NoiseTunnel, options.noiseTunnel, "noise_tunnel fields", "noiseTunnel");
  if (options.seed !== undefined && options.seed !== null) {
    const seed = integer(options.seed, "seed");
    if (seed < 0n || seed >= 1n << 64n) throw invalid(`seed: expected an integer in [0, 2^64-1], got ${seed}`);
    request.seed = seed;
  }
  if (options.priority !== undefined) {
    const priorities = { interactive: pb.Priority.PRIORITY_INTERACTIVE, batch: pb.Priority.PRIORITY_BATCH };
    if (!(options.priority in priorities)) throw invalid(`priority: expected "interactive" or "batch", got ${shown(options.priority)}`);
    request.priority = priorities[options.priority];
  }
  return request;
}

function decodeResponse(response: pb.AttributeResponse): Attribution<Tensor[]> {
  const t = response.timing;
  return {
    attributions: response.attributions.map(fromTensorMessage),
    convergenceDelta: response.convergenceDelta ? fromTensorMessage(response.convergenceDelta) : undefined,
    outputs: response.outputs ? fromTensorMessage(response.outputs) : undefined,
    modelVersion: response.modelVersion,
    seed: response.seed,
    timing: {
      queueMs: t?.queueMs ?? 0,
      computeMs: t?.computeMs ?? 0,
      totalMs: t?.totalMs ?? 0,
      rows: Number(t?.rows ?? 0n),
      passes: t?.passes ?? 0,
      passRows: Number(t?.passRows ?? 0n),
      passRequests: t?.passRequests ?? 0,
    },
    requestId: response.requestId,
    inputCasts: response.inputCasts.map((c) => [c.input, dtypeName(c.sent), dtypeName(c.used)]),
  };
}

// -- the client -------------------------------------------------------------------------------------------

/**
 * attrserve's AttributionService. `address` is "host:port" (or any grpc-js target, e.g. "dns:///attrserve:50051").
 *
 *     const client = new AttrserveClient("127.0.0.1:50051");
 *     const r = await client.attribute("toy", "integrated_gradients", [[0.2, 0.5, 0.3]], { target: 0 });
 *     console.log(r.attributions.data, r.attributions.shape);
 *     client.close();
 */
export class AttrserveClient {
  /** The generated grpc-js client, for calls this wrapper does not cover (e.g. AttributeStream). */
  readonly raw: pb.AttributionServiceClient;
  private readonly metadata: grpc.Metadata;

  constructor(address: string, options: ClientOptions = {}) {
    this.metadata = new grpc.Metadata();
    if (options.token !== undefined) {
      const token = options.token.trim();
      if (!token || !/^[\x21-\x7e]+$/.test(token)) throw new TypeError("token must be one word of printable ASCII characters");
      this.metadata.set("authorization", `Bearer ${token}`);
    }
    const channelOptions: grpc.ChannelOptions = {
      // Inputs and attributions easily pass gRPC's 4 MiB default; the server enforces its own limit.
      "grpc.max_send_message_length": -1,
      "grpc.max_receive_message_length": -1,
      ...options.channelOptions,
    };
    this.raw = new pb.AttributionServiceClient(address, options.credentials ?? grpc.credentials.createInsecure(), channelOptions);
  }

  /**
   * Attributions of `inputs` by `algorithm` (Captum's class name in snake_case, or a plugin's name). `inputs`: nested
   * numbers or a TensorInput for a one-input model (then `attributions` is one Tensor), or an array of TensorInputs,
   * one per input (then `attributions` is an array of them). Throws AttrserveError.
   */
  attribute(model: string, algorithm: string, inputs: readonly TensorInput[], options?: AttributeOptions): Promise<Attribution<Tensor[]>>;
  attribute(model: string, algorithm: string, inputs: TensorLike, options?: AttributeOptions): Promise<Attribution<Tensor>>;
  async attribute(
    model: string,
    algorithm: string,
    inputs: TensorLike | readonly TensorInput[],
    options: AttributeOptions = {},
  ): Promise<Attribution<Tensor> | Attribution<Tensor[]>> {
    const request = buildRequest(model, algorithm, inputs, options);
    const multi = isMulti(inputs);
    const response = await this.call<pb.AttributeRequest, pb.AttributeResponse>(
      (req, md, opts, cb) => this.raw.attribute(req, md, opts, cb),
      request,
      options.deadline,
    );
    const result = decodeResponse(response);
    if (multi) return result;
    if (result.attributions.length !== 1) throw new AttrserveError(grpc.status.INTERNAL, `expected 1 attribution tensor, got ${result.attributions.length}`);
    return { ...result, attributions: result.attributions[0] };
  }

  /** Every served model. */
  async listModels(options: { deadline?: number } = {}): Promise<ModelDescription[]> {
    const response = await this.call<pb.ListModelsRequest, pb.ListModelsResponse>(
      (req, md, opts, cb) => this.raw.listModels(req, md, opts, cb),
      {},
      options.deadline,
    );
    return response.models.map(describe);
  }

  /** One model: its config, layers and the algorithms it serves (NOT_FOUND for an unknown name). */
  async getModel(name: string, options: { version?: string; deadline?: number } = {}): Promise<ModelDescription> {
    const response = await this.call<pb.GetModelRequest, pb.GetModelResponse>(
      (req, md, opts, cb) => this.raw.getModel(req, md, opts, cb),
      { model: name, modelVersion: options.version ?? "" },
      options.deadline,
    );
    if (response.model === undefined) throw new AttrserveError(grpc.status.INTERNAL, "GetModel answered without a model");
    return describe(response.model);
  }

  close(): void {
    this.raw.close();
  }

  private call<Req, Res>(
    method: (req: Req, md: grpc.Metadata, opts: Partial<grpc.CallOptions>, cb: (e: grpc.ServiceError | null, r: Res) => void) => unknown,
    request: Req,
    deadlineMs?: number,
  ): Promise<Res> {
    const opts: Partial<grpc.CallOptions> = deadlineMs === undefined ? {} : { deadline: deadlineAt(deadlineMs) };
    return new Promise((resolve, reject) => {
      method(request, this.metadata.clone(), opts, (error, response) => {
        if (error) reject(new AttrserveError(error.code, error.details, error.metadata));
        else resolve(response);
      });
    });
  }
}

// grpc-js throws on a deadline past 10^8 hours where no caller can catch it (the process exits), and fails a call
// whose deadline is 0, negative or NaN at once: a deadline past a century is none, one that is no positive number
// is refused.
const NO_DEADLINE_MS = 100 * 365 * 86400 * 1000;

/** The call's deadline for `deadline` milliseconds from now (Infinity: none). */
function deadlineAt(ms: unknown): number {
  if (typeof ms !== "number" || !(ms > 0)) {
    throw invalid(`deadline: expected a positive number of milliseconds (Infinity: none), got ${typeof ms === "number" ? ms : shown(ms)}`);
  }
  return ms >= NO_DEADLINE_MS ? Infinity : Date.now() + ms;
}

function describe(info: pb.ModelInfo): ModelDescription {
  return { ...info, algorithmNames: info.algorithms.map(algorithmName) };
}
