// Run by init-replica-set.sh through mongosh: initiate the single-node replica set (MongoDB
// transactions need one) and create or update the service's own database user.
// Idempotent: an initiated set is left alone, an existing user gets the current password,
// so rotating APP_PASSWORD_FILE and re-running `docker compose up` rotates the credential.

const env = process.env;
const readSecret = (path) => fs.readFileSync(path, "utf8").trim();

const admin = db.getSiblingDB("admin");
admin.auth(env.MONGO_ROOT_USERNAME, readSecret(env.MONGO_ROOT_PASSWORD_FILE));

try {
  rs.status();
  print(`replica set already initiated on ${env.MONGO_HOST}`);
} catch (err) {
  if (err.codeName !== "NotYetInitialized") {
    throw err;
  }
  rs.initiate({
    _id: env.MONGO_REPLICA_SET,
    members: [{ _id: 0, host: env.MONGO_HOST }],
  });
  print(`replica set ${env.MONGO_REPLICA_SET} initiated with member ${env.MONGO_HOST}`);
}

// Users can only be written on a primary; a fresh set elects itself within a few seconds.
let waited = 0;
while (!admin.hello().isWritablePrimary) {
  if (waited >= 60) {
    throw new Error(`${env.MONGO_HOST} did not become primary within 60 s`);
  }
  sleep(1000);
  waited += 1;
}

// The service authenticates against its own database (authSource=APP_DB) and may read and write
// that database only: no admin roles, no access to any other database.
const appDb = db.getSiblingDB(env.APP_DB);
const roles = [{ role: "readWrite", db: env.APP_DB }];
const pwd = readSecret(env.APP_PASSWORD_FILE);
if (appDb.getUser(env.APP_USER)) {
  appDb.updateUser(env.APP_USER, { pwd, roles });
  print(`updated user ${env.APP_USER} on ${env.APP_DB}`);
} else {
  appDb.createUser({ user: env.APP_USER, pwd, roles });
  print(`created user ${env.APP_USER} on ${env.APP_DB}`);
}
