/**
 * The kit's types (src/types.ts) agree with the courier's OpenAPI document (openapi.json, the
 * output of `python -m comfy_courier openapi`; the Python suite keeps it current): the same
 * properties, the same required ones, the same JSON types and the same enum values. Read with
 * the TypeScript compiler's own type checker, so a drift on either side fails here.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import ts from "typescript";

type Schema = Record<string, any>;

const ROOT = fileURLToPath(new URL("../../", import.meta.url));
const DOC: Schema = JSON.parse(readFileSync(ROOT + "openapi.json", "utf8"));
const TYPES_FILE = ROOT + "src/types.ts";
const schemas: Schema = DOC.components.schemas;

const program = ts.createProgram([TYPES_FILE], { strict: true, target: ts.ScriptTarget.ES2022, noEmit: true });
const checker = program.getTypeChecker();
const source = program.getSourceFile(TYPES_FILE)!;
const exported = new Map(checker.getExportsOfModule(checker.getSymbolAtLocation(source)!).map((s) => [s.name, s]));

function tsType(name: string): ts.Type {
  const symbol = exported.get(name);
  assert.ok(symbol, `src/types.ts exports no ${name}`);
  return checker.getDeclaredTypeOfSymbol(symbol);
}

// ---- the document's side --------------------------------------------------------------

function resolve(schema: Schema): Schema {
  let out = schema;
  while (out.$ref) {
    const path = (out.$ref as string).replace(/^#\//, "").split("/");
    out = path.reduce((node: Schema, key) => node[key.replace(/~1/g, "/").replace(/~0/g, "~")], DOC);
  }
  return out;
}

/** An object schema's properties and required names, merged over `allOf` (the responses narrow `error.type`). */
function objectView(schema: Schema): { properties: Schema; required: Set<string>; additional: unknown } {
  const s = resolve(schema);
  const view = { properties: { ...(s.properties ?? {}) } as Schema, required: new Set<string>(s.required ?? []), additional: s.additionalProperties };
  for (const part of (s.allOf ?? []).map(objectView)) {
    for (const [key, value] of Object.entries(part.properties)) {
      view.properties[key] = view.properties[key] ? { allOf: [view.properties[key], value] } : value;
    }
    part.required.forEach((r: string) => view.required.add(r));
    view.additional ??= part.additional;
  }
  return view;
}

interface Shape {
  kinds: Set<string>; // string, number, boolean, null, array, object
  literals: Set<string>; // enum / const values (not null)
  open: boolean; // any string beside the literals
}

function docShape(schema: Schema): Shape {
  const s = resolve(schema);
  if (s.allOf) {
    // every part holds: the kinds and values they share (a rejection's narrowed error.type)
    const parts = s.allOf.map(docShape) as Shape[];
    const narrowest = parts.filter((p) => p.literals.size > 0 && !p.open).at(-1) ?? parts.at(-1)!;
    return narrowest;
  }
  const shape: Shape = { kinds: new Set(), literals: new Set(), open: false };
  for (const part of [...(s.anyOf ?? []), ...(s.oneOf ?? [])] as Schema[]) {
    const other = docShape(part);
    other.kinds.forEach((k) => shape.kinds.add(k));
    other.literals.forEach((l) => shape.literals.add(l));
    shape.open ||= other.open;
  }
  const values: unknown[] = "const" in s ? [s.const] : s.enum ?? [];
  for (const v of values) {
    shape.kinds.add(v === null ? "null" : typeof v);
    if (v !== null) shape.literals.add(String(v));
  }
  for (const t of [s.type ?? []].flat() as string[]) shape.kinds.add(t === "integer" ? "number" : t);
  if (values.length === 0 && [s.type ?? []].flat().includes("string")) shape.open = true;
  return shape;
}

// ---- the kit's side ---------------------------------------------------------------------

function members(type: ts.Type): ts.Type[] {
  return type.isUnion() ? type.types : [type];
}

function tsShape(type: ts.Type): Shape {
  const shape: Shape = { kinds: new Set(), literals: new Set(), open: false };
  for (const t of members(type)) {
    if (t.flags & ts.TypeFlags.Undefined) continue; // an optional property
    if (t.flags & ts.TypeFlags.Null) shape.kinds.add("null");
    else if (t.isStringLiteral()) (shape.kinds.add("string"), shape.literals.add(t.value));
    else if (t.isNumberLiteral()) (shape.kinds.add("number"), shape.literals.add(String(t.value)));
    else if (t.flags & ts.TypeFlags.BooleanLiteral) (shape.kinds.add("boolean"), shape.literals.add(checker.typeToString(t)));
    else if (t.flags & ts.TypeFlags.String) (shape.kinds.add("string"), (shape.open = true));
    else if (t.isIntersection() && t.types.some((p) => p.flags & ts.TypeFlags.String)) (shape.kinds.add("string"), (shape.open = true));
    else if (t.flags & ts.TypeFlags.Number) shape.kinds.add("number");
    else if (t.flags & ts.TypeFlags.Boolean) shape.kinds.add("boolean");
    else if (checker.isArrayType(t) || checker.isTupleType(t)) shape.kinds.add("array");
    else if (t.flags & ts.TypeFlags.Object) shape.kinds.add("object");
    else if (t.flags & ts.TypeFlags.Unknown) ["string", "number", "boolean", "null", "array", "object"].forEach((k) => shape.kinds.add(k));
    else shape.kinds.add(`?${checker.typeToString(t)}`);
  }
  // `true | false` is boolean
  if (shape.literals.has("true") && shape.literals.has("false")) (shape.literals.delete("true"), shape.literals.delete("false"));
  return shape;
}

const sorted = (set: Set<string>) => [...set].sort();

/** Differences between a TS object type and a document schema, recursing into nested objects and arrays. */
function compare(type: ts.Type, schema: Schema, where: string, problems: string[]): void {
  const s = resolve(schema);
  if (s.oneOf || s.anyOf) {
    const docParts = [...(s.oneOf ?? []), ...(s.anyOf ?? [])].map(resolve);
    const tsParts = members(type).filter((t) => !(t.flags & ts.TypeFlags.Undefined));
    if (docParts.length !== tsParts.length) problems.push(`${where}: ${tsParts.length} union members, the document has ${docParts.length}`);
    // pair the members by their discriminator literal
    const key = s.discriminator?.propertyName as string | undefined;
    for (const part of docParts) {
      const literal = key ? docShape(part.properties[key]).literals : new Set<string>();
      const match = tsParts.find((t) => {
        const prop = key ? t.getProperty(key) : undefined;
        return prop && sorted(tsShape(checker.getTypeOfSymbol(prop)).literals).join() === sorted(literal).join();
      });
      if (!match) problems.push(`${where}: no member with ${key} ${sorted(literal)}`);
      else compare(match, part, `${where}<${sorted(literal)}>`, problems);
    }
    return;
  }
  const view = objectView(schema);
  const docProps = view.properties;
  const required = view.required;
  const tsProps = new Map(checker.getPropertiesOfType(type).map((p) => [p.name, p]));
  for (const name of new Set([...Object.keys(docProps), ...tsProps.keys()])) {
    const at = `${where}.${name}`;
    const prop = tsProps.get(name);
    if (!prop) {
      problems.push(`${at}: in the document, not in the kit's type`);
      continue;
    }
    if (!(name in docProps)) {
      problems.push(`${at}: in the kit's type, not in the document`);
      continue;
    }
    const optional = (prop.flags & ts.SymbolFlags.Optional) !== 0;
    if (optional === required.has(name)) {
      problems.push(`${at}: ${required.has(name) ? "required" : "optional"} in the document, ${optional ? "optional" : "required"} in the kit`);
    }
    const propType = checker.getTypeOfSymbol(prop);
    compareValue(propType, docProps[name], at, problems);
  }
  // a map type (Record<string, X>) against additionalProperties
  const index = checker.getIndexInfosOfType(type).find((i) => i.keyType.flags & ts.TypeFlags.String);
  if (index && typeof view.additional === "object") compareValue(index.type, view.additional as Schema, `${where}[*]`, problems);
  if (!index && view.additional !== false && Object.keys(docProps).length > 0 && where.split(".").length === 1) {
    problems.push(`${where}: the document allows extra keys; the kit's type should keep them ([key: string]: unknown)`);
  }
}

function compareValue(type: ts.Type, schema: Schema, at: string, problems: string[]): void {
  const mine = tsShape(type);
  const theirs = docShape(schema);
  if (sorted(mine.kinds).join() !== sorted(theirs.kinds).join()) {
    problems.push(`${at}: JSON types ${sorted(mine.kinds)} in the kit, ${sorted(theirs.kinds)} in the document`);
  }
  if (sorted(mine.literals).join() !== sorted(theirs.literals).join()) {
    problems.push(`${at}: values ${JSON.stringify(sorted(mine.literals))} in the kit, ${JSON.stringify(sorted(theirs.literals))} in the document`);
  }
  // the kit reads error_type as AnyErrorType: a newer courier may add an error type
  const widenedErrorType = mine.open && !theirs.open && sorted(theirs.literals).join() === [...schemas.ErrorType.enum].sort().join();
  if (theirs.literals.size > 0 && mine.open !== theirs.open && !widenedErrorType) {
    problems.push(`${at}: ${mine.open ? "any string" : "only the listed values"} in the kit, ${theirs.open ? "any string" : "only the listed values"} in the document`);
  }
  const nonNull = members(type).filter((t) => !(t.flags & (ts.TypeFlags.Null | ts.TypeFlags.Undefined)));
  const s = resolve(schema);
  if (nonNull.length === 1 && checker.isArrayType(nonNull[0]!) && s.items) {
    compareValue(checker.getTypeArguments(nonNull[0] as ts.TypeReference)[0]!, s.items, `${at}[]`, problems);
  } else if (
    nonNull.length === 1 &&
    nonNull[0]!.flags & ts.TypeFlags.Object &&
    !checker.isArrayType(nonNull[0]!) &&
    (s.properties || s.oneOf || s.allOf || typeof s.additionalProperties === "object")
  ) {
    compare(nonNull[0]!, schema, at, problems);
  }
}

function differences(typeName: string, schema: Schema): string[] {
  const problems: string[] = [];
  compare(tsType(typeName), schema, typeName, problems);
  return problems;
}

const webhookBody = (name: string): Schema => DOC.webhooks[name].post.requestBody.content["application/json"].schema;

test("the request body, the status body and the rejection body match the document", () => {
  assert.deepEqual(differences("ExecuteWorkflowRequest", schemas.ExecuteWorkflowRequest), []);
  assert.deepEqual(differences("WorkflowNode", schemas.WorkflowNode), []);
  assert.deepEqual(differences("JobStatus", schemas.JobStatus), []);
  assert.deepEqual(differences("RejectionBody", schemas.Rejection), []);
  const post = DOC.paths["/execute-workflow"].post;
  assert.deepEqual(differences("ExecuteWorkflowRequest", post.requestBody.content["application/json"].schema), []);
  for (const status of ["200", "202"]) assert.deepEqual(differences("JobStatus", post.responses[status].content["application/json"].schema), []);
});

test("the callback and the status update match the document's webhooks", () => {
  assert.deepEqual(differences("CallbackBody", webhookBody("callback")), []);
  assert.deepEqual(differences("SuccessCallback", schemas.SuccessCallback), []);
  assert.deepEqual(differences("ErrorCallback", schemas.ErrorCallback), []);
  assert.deepEqual(differences("CallbackOutput", schemas.CallbackOutput), []);
  assert.deepEqual(differences("StatusUpdateBody", webhookBody("statusUpdate")), []);
});

test("the enums match: job states, error types, delivery states, the courier's rejection types", () => {
  const values = (name: string) => sorted(tsShape(tsType(name)).literals);
  assert.deepEqual(values("JobState"), [...schemas.JobState.enum].sort());
  assert.deepEqual(values("ErrorType"), [...schemas.ErrorType.enum].sort());
  assert.deepEqual(values("CallbackDeliveryState"), [...schemas.CallbackDelivery.properties.state.enum].sort());
  // every `error.type` any route documents (ComfyUI's validation types pass through: the kit keeps `string`)
  const documented = new Set<string>();
  for (const item of Object.values(DOC.paths) as Schema[]) {
    for (const operation of Object.values(item).filter((o: any) => o?.responses) as Schema[]) {
      for (const response of Object.values(operation.responses) as Schema[]) {
        const schema = response.content?.["application/json"]?.schema;
        if (!schema) continue;
        const error = objectView(schema).properties.error;
        if (error) docShape(objectView(error).properties.type ?? {}).literals.forEach((t) => documented.add(t));
      }
    }
  }
  assert.deepEqual(values("RejectionType"), sorted(documented));
  assert.ok(tsShape(tsType("RejectionType")).open, "RejectionType keeps (string & {}) for ComfyUI's types");
});

test("the comparison does catch a drift (it is not vacuous)", () => {
  const drifted = structuredClone(schemas.JobStatus);
  drifted.required = drifted.required.filter((k: string) => k !== "progress");
  drifted.properties.state = { type: "string", enum: ["queued", "done"] };
  drifted.properties.extra = { type: "integer" };
  delete drifted.properties.image_urls;
  const found = differences("JobStatus", drifted);
  assert.equal(found.length, 4, found.join("\n"));
  assert.ok(found.some((p) => p.startsWith("JobStatus.progress: optional in the document")));
  assert.ok(found.some((p) => p.startsWith("JobStatus.state: values")));
  assert.ok(found.some((p) => p.startsWith("JobStatus.extra: in the document")));
  assert.ok(found.some((p) => p.startsWith("JobStatus.image_urls: in the kit's type")));
  assert.ok(differences("CallbackOutput", schemas.JobStatus).length > 5);
});
