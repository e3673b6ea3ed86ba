// fhir-kit-client's SMART discovery against a FHIR base; prints what it found as JSON.
// `raced`: smartAuthMetadata() (well-known and /metadata raced, first answer wins);
// `wellKnown`: the library's own reading of [base]/.well-known/smart-configuration alone.
// Usage: node discover.mjs <fhir base>
import Client from 'fhir-kit-client';
import smart from 'fhir-kit-client/lib/smart.js';

const [baseUrl] = process.argv.slice(2);
const client = new Client({ baseUrl });
const wellKnownDoc = await client.httpClient.request('GET', `${baseUrl.replace(/\/*$/, '/')}.well-known/smart-configuration`, {});
const wellKnown = smart.authFromWellKnown(wellKnownDoc);
const raced = await client.smartAuthMetadata();
console.log(JSON.stringify({ raced, wellKnown }));
