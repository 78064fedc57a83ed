// The Khronos glTF validator on GLB files: prints "<file> errors N warnings N" and the first messages.
//     npm install gltf-validator && NODE_PATH=$PWD/node_modules node docs/validate_glb.js mesh.glb ...
const validator = require('gltf-validator');
const fs = require('fs');
(async () => {
  for (const f of process.argv.slice(2)) {
    const r = await validator.validateBytes(new Uint8Array(fs.readFileSync(f)));
    const first = r.issues.messages.filter(m => m.severity <= 1).slice(0, 5).map(m => `${m.code}: ${m.message}`);
    console.log(`${f} errors ${r.issues.numErrors} warnings ${r.issues.numWarnings}`, first.join(' | '));
  }
})();
