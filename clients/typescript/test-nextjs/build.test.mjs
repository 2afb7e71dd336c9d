/**
 * The README's examples build in a Next.js 16 App Router app with no variables set, and answer.
 *
 * `npm run test:nextjs` (slow: a Next.js install and two builds). It packs the kit with
 * `npm pack`, installs the tarball into the app in ./app, writes every README code block that
 * starts with `// app/.../route.ts` or `// next.config.ts` into it (so the test breaks when
 * the README drifts), adds an Edge-runtime copy of the callback route, and runs `next build`
 * (Turbopack, Next 16's default) and `next build --webpack` with an environment holding no
 * variable of the app's. Then `next start` answers a callback with the kit's `not_configured`
 * (500), on the Node and the Edge route: the handlers run without the variables too; and,
 * started with them (Supabase pointed at a stand-in for its RPC endpoint), both routes verify
 * a signed callback, call `handle_comfy_callback` with it, and refuse a bad signature.
 *
 * The app is built in COURIER_NEXTJS_DIR (default: <tmp>/comfy-courier-nextjs), kept between
 * runs with its node_modules, so a second run installs nothing new (npm's cache serves the rest).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync, spawn } from "node:child_process";
import { cpSync, existsSync, mkdirSync, readFileSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { createServer as createHttpServer } from "node:http";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const HERE = dirname(fileURLToPath(import.meta.url));
const KIT = join(HERE, "..");
const WORK = process.env.COURIER_NEXTJS_DIR ?? join(tmpdir(), "comfy-courier-nextjs");
const APP = join(WORK, "app");
// Only what node and npm need: none of the app's variables (SUPABASE_*, COMFY_*).
const BARE_ENV = {
  PATH: process.env.PATH,
  HOME: process.env.HOME ?? WORK,
  NEXT_TELEMETRY_DISABLED: "1",
  ...(process.env.npm_config_cache ? { npm_config_cache: process.env.npm_config_cache } : {}),
};

function run(command, args, cwd, env = BARE_ENV) {
  const started = Date.now();
  const output = execFileSync(command, args, { cwd, env, encoding: "utf8", stdio: ["ignore", "pipe", "pipe"], maxBuffer: 64 << 20 });
  return { output, seconds: (Date.now() - started) / 1000 };
}

/** README code blocks that name their file on the first line: path -> source. */
function readmeFiles() {
  const readme = readFileSync(join(KIT, "README.md"), "utf8");
  const files = new Map();
  for (const [, body] of readme.matchAll(/```ts\n(.*?)```/gs)) {
    const first = body.split("\n", 1)[0];
    const named = /^\/\/ ((?:app\/\S+\/route|next\.config)\.ts)$/.exec(first);
    if (named) files.set(named[1], body);
  }
  return files;
}

async function freePort() {
  return new Promise((resolve) => {
    const server = createServer().listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

const timings = {};

/** `next start` on a free port with `env`; resolves once it answers. */
async function startNext(env) {
  const port = await freePort();
  const server = spawn(join(APP, "node_modules/.bin/next"), ["start", "-p", String(port), "-H", "127.0.0.1"], { cwd: APP, env, stdio: "ignore" });
  const url = `http://127.0.0.1:${port}`;
  const deadline = Date.now() + 60_000;
  for (;;) {
    try {
      await fetch(url);
      return { url, stop: () => server.kill("SIGTERM") };
    } catch (error) {
      if (Date.now() > deadline || server.exitCode !== null) {
        server.kill("SIGTERM");
        throw new Error(`next start did not answer: ${error}`);
      }
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
  }
}

/** Supabase's PostgREST RPC endpoint, as far as the callback route uses it. */
async function fakeSupabase() {
  const calls = [];
  const server = createHttpServer((request, response) => {
    let body = "";
    request.on("data", (chunk) => (body += chunk));
    request.on("end", () => {
      calls.push({ path: request.url, apikey: request.headers.apikey, body: JSON.parse(body || "null") });
      response.writeHead(200, { "content-type": "application/json" }).end(JSON.stringify("applied"));
    });
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return { url: `http://127.0.0.1:${server.address().port}`, calls, close: () => server.close() };
}

test("the README's route handlers build in Next.js 16 (Turbopack and webpack) with no variables set", { timeout: 900_000 }, async (t) => {
  const files = readmeFiles();
  assert.deepEqual([...files.keys()].sort(), ["app/api/comfy-callback/route.ts", "app/api/generate/route.ts", "next.config.ts"]);
  const callback = files.get("app/api/comfy-callback/route.ts");
  assert.match(callback, /^export const runtime = "nodejs";/m, "the README recommends the Node runtime");
  const edge = callback.replace(/^export const runtime = "nodejs";.*$/m, 'export const runtime = "edge";');

  // the app, kept between runs; README files and the kit are laid anew every time
  mkdirSync(WORK, { recursive: true });
  cpSync(join(HERE, "app"), APP, { recursive: true });
  rmSync(join(APP, "app", "api"), { recursive: true, force: true });
  rmSync(join(APP, ".next"), { recursive: true, force: true });
  for (const [path, source] of files) {
    mkdirSync(dirname(join(APP, path)), { recursive: true });
    writeFileSync(join(APP, path), source);
  }
  mkdirSync(join(APP, "app/api/comfy-callback-edge"), { recursive: true });
  writeFileSync(join(APP, "app/api/comfy-callback-edge/route.ts"), edge);

  for (const old of readdirSync(WORK).filter((f) => f.endsWith(".tgz"))) rmSync(join(WORK, old));
  const pack = run("npm", ["pack", "--pack-destination", WORK, "--silent"], KIT, { ...BARE_ENV, ...process.env });
  timings.pack_s = pack.seconds;
  const tarball = pack.output.trim().split("\n").pop();
  assert.ok(existsSync(join(WORK, tarball)), pack.output);
  const install = run("npm", ["install", "--no-audit", "--no-fund", "--prefer-offline", "--no-save", join(WORK, tarball)], APP);
  timings.install_s = install.seconds;

  for (const [name, args] of [["turbopack", ["build"]], ["webpack", ["build", "--webpack"]]]) {
    rmSync(join(APP, ".next"), { recursive: true, force: true });
    let build;
    try {
      build = run(join(APP, "node_modules/.bin/next"), args, APP);
    } catch (error) {
      assert.fail(`next ${args.join(" ")} failed:\n${error.stdout}\n${error.stderr}`);
    }
    timings[`build_${name}_s`] = build.seconds;
    for (const route of ["/api/comfy-callback", "/api/comfy-callback-edge", "/api/generate"]) {
      assert.ok(build.output.includes(route), `${name}: ${route} is not in the build output:\n${build.output}`);
    }
  }

  // the built app (webpack's, the last) answers without the variables: the kit refuses the
  // callback with not_configured (500, so the courier retries) instead of crashing at import
  const bare = await startNext(BARE_ENV);
  try {
    for (const route of ["/api/comfy-callback", "/api/comfy-callback-edge"]) {
      const answer = await fetch(bare.url + route, { method: "POST", headers: { "webhook-id": "msg_1" }, body: "{}" });
      assert.equal(answer.status, 500, route);
      assert.deepEqual(await answer.json(), { error: "not_configured" }, route);
    }
  } finally {
    bare.stop();
  }

  // configured: both runtimes verify a signed callback (standardwebhooks on the Edge too) and
  // hand it to the database function; a wrong signature never reaches the database
  const { signWebhook } = await import(join(KIT, "dist/src/index.js"));
  const supabase = await fakeSupabase();
  const secret = "whsec_" + Buffer.from("comfy-courier-nextjs-check-secret").toString("base64");
  const configured = await startNext({
    ...BARE_ENV,
    COMFY_CALLBACK_API_KEY: "cb-key",
    COMFY_WEBHOOK_SECRET: secret,
    SUPABASE_URL: supabase.url,
    SUPABASE_SERVICE_ROLE_KEY: "service-role-key",
  });
  try {
    const event = {
      content_request_id: "11111111-1111-4111-8111-111111111111", status: "success",
      image_url: "https://cdn.example/1-0.jpg", error_message: null, attempt: 1,
      prompt_id: "0b7e1c2a-4f3e-4f3e-9a1b-2c3d4e5f6a7b", image_urls: ["https://cdn.example/1-0.jpg"],
    };
    const body = JSON.stringify(event);
    for (const route of ["/api/comfy-callback", "/api/comfy-callback-edge"]) {
      const stamp = Math.floor(Date.now() / 1000);
      const headers = {
        "content-type": "application/json", "x-api-key": "cb-key", "webhook-id": `msg${route.replaceAll("/", "_")}`,
        "webhook-timestamp": String(stamp),
        "webhook-signature": await signWebhook(secret, `msg${route.replaceAll("/", "_")}`, stamp, body),
      };
      const answer = await fetch(configured.url + route, { method: "POST", headers, body });
      assert.deepEqual([answer.status, await answer.json()], [200, { ok: true, outcome: "applied" }], route);
      const forged = await fetch(configured.url + route, { method: "POST", headers: { ...headers, "webhook-signature": "v1,AAAA" }, body });
      assert.deepEqual([forged.status, await forged.json()], [401, { error: "bad_signature" }], route);
    }
    assert.equal(supabase.calls.length, 2);
    for (const call of supabase.calls) {
      assert.equal(call.path, "/rest/v1/rpc/handle_comfy_callback");
      assert.equal(call.apikey, "service-role-key");
      assert.deepEqual(call.body.event, event);
      assert.match(call.body.event_id, /^msg_api_comfy-callback/);
    }
  } finally {
    configured.stop();
    supabase.close();
  }
  t.diagnostic(`timings ${JSON.stringify(timings)}`);
});
