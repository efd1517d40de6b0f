// Drives the compiled TypeScript client (clients/typescript) against a live server and prints one JSON object.
// Usage: node ts_smoke.cjs DIST_DIR ADDRESS [TOKEN]   (tests/clients/test_typescript_client.py runs it)
// With TOKEN (a server that checks bearer tokens): ListModels with it, without one and with a wrong one.
"use strict";
const path = require("node:path");

const [distDir, address, token] = process.argv.slice(2);
const { AttrserveClient, AttrserveError, toNested } = require(path.resolve(distDir, "index.js"));

const X = [
  [0.2961119413, 0.516562283, 0.2516707182],
  [0.6885567904, 0.0739724636, 0.8665219545],
];
const MULTI = [
  [[0.3, -0.2, 0.9, 1.4], [1.0, 0.5, -0.4, 0.2]],
  [[0.7, -1.1, 0.05], [-0.3, 0.8, 1.2]],
];

async function failure(promise) {
  try {
    await promise;
    return { thrown: false };
  } catch (e) {
    return {
      thrown: true,
      isAttrserveError: e instanceof AttrserveError,
      isError: e instanceof Error,
      name: e.name,
      code: e.code,
      codeName: e.codeName,
      details: e.details,
      message: e.message,
    };
  }
}

const plain = (t) => t && { data: Array.from(t.data, Number), shape: t.shape, dtype: t.dtype, typedArray: t.data.constructor.name };

async function auth() {
  const clients = [new AttrserveClient(address, { token }), new AttrserveClient(address), new AttrserveClient(address, { token: "wrong-token" })];
  try {
    const [good, none, wrong] = clients;
    const models = await good.listModels({ deadline: 30000 });
    const out = {
      models: models.map((m) => m.config && m.config.name),
      withoutToken: await failure(none.listModels({ deadline: 30000 })),
      wrongToken: await failure(wrong.listModels({ deadline: 30000 })),
    };
    process.stdout.write(JSON.stringify(out) + "\n");
  } finally {
    clients.forEach((c) => c.close());
  }
}

async function main() {
  const client = new AttrserveClient(address);
  try {
    const models = await client.listModels({ deadline: 30000 });
    const toy = await client.getModel("toy");
    const ig = await client.attribute("toy", "integrated_gradients", X, {
      baselines: 0,
      target: 0,
      returnConvergenceDelta: true,
      deadline: 60000,
    });
    // A typed-array input, per-example targets and Captum-named params.
    const typed = await client.attribute(
      "toy",
      "integrated_gradients",
      { data: Float32Array.from(X.flat()), shape: [2, 3] },
      { target: [0, 1], params: { n_steps: 20, method: "riemann_trapezoid", internal_batch_size: 3 }, seed: 7 },
    );
    // NoiseTunnel with Captum's memory hint (taken; the numbers are Captum's).
    const smoothed = await client.attribute("toy", "saliency", X, {
      target: 0,
      noiseTunnel: { nt_samples: 3, stdevs: 0.1, nt_samples_batch_size: 3 },
      seed: 4,
    });
    // Two inputs (the oracle's `multi`: 4 and 3 features): one Float64Array and one nested-number tensor per input,
    // one baseline per input; the attributions come back one per input.
    const multi = await client.attribute(
      "multi",
      "integrated_gradients",
      [
        { data: Float64Array.from(MULTI[0].flat()), shape: [2, 4], dtype: "float32" },
        { data: MULTI[1].flat(), shape: [2, 3] },
      ],
      { target: 1, baselines: [0.5, { data: [0.1, 0.2, 0.3], shape: [1, 3] }], params: { n_steps: 16 } },
    );
    // Occlusion's strides in Captum's forms for two inputs: one int per input (its every dim), or an int and a list.
    const windows = { sliding_window_shapes: [[2], [2]] };
    const two = [{ data: MULTI[0].flat(), shape: [2, 4] }, { data: MULTI[1].flat(), shape: [2, 3] }];
    const occlusion = await client.attribute("multi", "occlusion", two, { target: 1, params: { ...windows, strides: [2, 1] } });
    const occlusionMixed = await client.attribute("multi", "occlusion", two, { target: 1, params: { ...windows, strides: [1, [2]] } });
    const out = {
      occlusion: occlusion.attributions.map(plain),
      occlusionMixed: occlusionMixed.attributions.map(plain),
      multi: { attributions: multi.attributions.map(plain), nested: multi.attributions.map(toNested) },
      models: models.map((m) => ({ name: m.config && m.config.name, ready: m.ready, algorithms: m.algorithmNames })),
      toy: { name: toy.config.name, algorithms: toy.algorithmNames, layers: toy.layers, inputs: toy.config.inputs.map((i) => ({ name: i.name, dims: i.dims.map(Number) })) },
      ig: { attributions: plain(ig.attributions), convergenceDelta: plain(ig.convergenceDelta), modelVersion: ig.modelVersion, seed: ig.seed.toString(), timing: ig.timing },
      typed: { attributions: plain(typed.attributions), seed: typed.seed.toString() },
      smoothed: { attributions: plain(smoothed.attributions) },
      // Rejected by the server: a target past the model's 2 outputs.
      badTarget: await failure(client.attribute("toy", "integrated_gradients", X, { target: 5 })),
      // Rejected by the server: params out of range.
      badParams: await failure(client.attribute("toy", "integrated_gradients", X, { target: 0, params: { n_steps: 0 } })),
      // Refused by the client before sending: an unknown parameter name.
      unknownParam: await failure(client.attribute("toy", "integrated_gradients", X, { params: { nsteps: 3 } })),
      unknownModel: await failure(client.getModel("no-such-model")),
      // Refused by the client: values the wire cannot hold (they were wrapped silently, or INTERNAL from grpc-js's
      // serializer), and deadlines grpc-js fails at once.
      wideUint8: await failure(client.attribute("toy", "saliency", { data: [300, 1, 2], shape: [1, 3], dtype: "uint8" }, { target: 0 })),
      wideInt32: await failure(client.attribute("toy", "saliency", { data: new Float64Array([3e9, 1, 2]), shape: [1, 3], dtype: "int32" }, { target: 0 })),
      fractionalParam: await failure(client.attribute("toy", "integrated_gradients", X, { target: 0, params: { n_steps: 1.5 } })),
      wideParam: await failure(client.attribute("toy", "integrated_gradients", X, { target: 0, params: { n_steps: 2 ** 40 } })),
      wideTarget: await failure(client.attribute("toy", "saliency", X, { target: 2 ** 70 })),
      bigintPluginParam: await failure(client.attribute("toy", "some_plugin", X, { target: 0, params: { k: 1n } })),
      nanDeadline: await failure(client.listModels({ deadline: NaN })),
      negativeDeadline: await failure(client.attribute("toy", "saliency", X, { target: 0, deadline: -5 })),
      // Past what grpc-js can hold (10^8 hours): it threw where no caller could catch it, and the process exited.
      farDeadline: (await client.listModels({ deadline: 1e20 })).length,
    };
    // The server still answers, with the numbers it gave before the refusals.
    const again = await client.attribute("toy", "integrated_gradients", X, { baselines: 0, target: 0, returnConvergenceDelta: true, deadline: 1e20 });
    out.igAgain = { attributions: plain(again.attributions), convergenceDelta: plain(again.convergenceDelta) };
    process.stdout.write(JSON.stringify(out) + "\n");
  } finally {
    client.close();
  }
}

(token ? auth() : main()).catch((e) => {
  console.error(e && e.stack ? e.stack : e);
  process.exit(1);
});
