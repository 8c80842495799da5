#!/usr/bin/env python3
"""Writes the labelled masking corpus (one JSON-lines file per language or
kind) that `tests/corpus.rs` scores the detectors against.

Every value is made here and labelled as it is made: a card number is built
to pass (or, for a hard negative, to fail) Luhn, an IBAN gets computed (or
broken) mod-97 check digits, a password is put where a person would write
one. Nothing is labelled by running the detectors, so the score can fail.

Each line: {"id", "lang", "kind", "role", "text",
            "find": [[detector, value], ...],      # what must be masked
            "not":  [[value, [detector, ...]], ...]}  # hard negatives and
                                                    # the detectors they tempt
Run from this directory: python3 generate.py  (deterministic: seed 22).
"""

import base64
import json
import random
import string

R = random.Random(22)

# ---------------------------------------------------------------- values


def luhn_digit(body):
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return str((10 - total % 10) % 10)


def card_digits(valid=True):
    kind = R.choice(["visa", "visa", "mc", "mc2", "amex"])
    if kind == "visa":
        body = "4" + "".join(R.choice(string.digits) for _ in range(14))
    elif kind == "mc":
        body = "5" + R.choice("12345") + "".join(R.choice(string.digits) for _ in range(13))
    elif kind == "mc2":
        body = "2" + R.choice(["221", "300", "500", "720"]) + "".join(R.choice(string.digits) for _ in range(11))
    else:
        body = "3" + R.choice("47") + "".join(R.choice(string.digits) for _ in range(12))
    check = luhn_digit(body)
    if not valid:
        check = str((int(check) + R.randint(1, 9)) % 10)
    return body + check


def fmt_card(d, sep=None):
    if sep is None:
        sep = R.choice([" ", " ", "-", ""])
    if len(d) == 15:
        parts = [d[:4], d[4:10], d[10:]]
    else:
        parts = [d[i:i + 4] for i in range(0, len(d), 4)]
    return sep.join(parts)


def card(valid=True):
    return fmt_card(card_digits(valid))


IBAN_BBAN = {
    "DE": lambda: digits(18),
    "FR": lambda: digits(10) + "".join(R.choice(string.ascii_uppercase + string.digits) for _ in range(11)) + digits(2),
    "ES": lambda: digits(20),
    "GB": lambda: R.choice(["NWBK", "BARC", "LOYD", "HBUK", "MIDL"]) + digits(14),
    "NL": lambda: R.choice(["ABNA", "INGB", "RABO"]) + digits(10),
    "AT": lambda: digits(16),
    "CH": lambda: digits(17),
    "BE": lambda: digits(12),
    "IT": lambda: R.choice(string.ascii_uppercase) + digits(22),
}


def digits(n):
    return "".join(R.choice(string.digits) for _ in range(n))


def mod97(s):
    num = "".join(str(int(c, 36)) for c in s)
    return int(num) % 97


def iban_compact(country=None, valid=True):
    country = country or R.choice(list(IBAN_BBAN))
    bban = IBAN_BBAN[country]()
    check = 98 - mod97(bban + country + "00")
    if not valid:
        check = (check + R.randint(1, 90)) % 97 + 2
        if check == 98 - mod97(bban + country + "00"):
            check = check % 96 + 2
    return country + f"{check:02d}" + bban


def iban(country=None, valid=True, spaced=None):
    c = iban_compact(country, valid)
    if spaced is None:
        spaced = R.random() < 0.6
    if spaced:
        return " ".join(c[i:i + 4] for i in range(0, len(c), 4))
    return c


def ssn():
    while True:
        a = R.randint(1, 899)
        if a != 666:
            break
    return f"{a:03d}-{R.randint(1, 99):02d}-{R.randint(1, 9999):04d}"


def phone(lang):
    if lang == "en":
        a, b, c = R.randint(201, 989), R.randint(200, 989), R.randint(0, 9999)
        return R.choice([
            f"({a}) {b}-{c:04d}", f"{a}-{b}-{c:04d}", f"+1 {a} {b} {c:04d}",
            f"+1 ({a}) {b}-{c:04d}", f"{a}.{b}.{c:04d}",
            f"+44 20 {R.randint(7000, 8999)} {R.randint(1000, 9999)}",
            f"+44 7{R.randint(100, 999)} {R.randint(100000, 999999)}",
        ])
    if lang == "de":
        return R.choice([
            f"+49 30 {R.randint(1000000, 99999999)}", f"0{R.choice(['151', '160', '171', '176'])} {R.randint(1000000, 99999999)}",
            f"+49 {R.choice(['151', '160', '171'])} {R.randint(1000000, 99999999)}",
            f"0{R.choice(['30', '40', '89', '221'])} {R.randint(100000, 9999999)}",
            f"0{R.choice(['30', '40', '89'])}-{R.randint(1000000, 9999999)}",
            f"+43 1 {R.randint(100000, 9999999)}", f"+41 44 {R.randint(100, 999)} {R.randint(10, 99)} {R.randint(10, 99)}",
        ])
    if lang == "fr":
        p = lambda: f"{R.randint(0, 99):02d}"
        return R.choice([
            f"0{R.choice('1234567')} {p()} {p()} {p()} {p()}", f"0{R.choice('67')}.{p()}.{p()}.{p()}.{p()}",
            f"+33 {R.choice('1234567')} {p()} {p()} {p()} {p()}", f"+33{R.choice('67')}{p()}{p()}{p()}{p()}",
            f"+32 {R.randint(470, 499)} {R.randint(10, 99)} {R.randint(10, 99)} {R.randint(10, 99)}",
        ])
    return R.choice([
        f"+34 {R.choice('67')}{R.randint(10, 99)} {R.randint(100, 999)} {R.randint(100, 999)}",
        f"+34 91 {R.randint(100, 999)} {R.randint(10, 99)} {R.randint(10, 99)}",
        f"+34{R.choice('67')}{R.randint(10000000, 99999999)}",
        f"+52 55 {R.randint(1000, 9999)} {R.randint(1000, 9999)}",
        f"{R.choice('67')}{R.randint(10, 99)} {R.randint(100, 999)} {R.randint(100, 999)}",
    ])


FIRST = {
    "en": ["james", "emily", "michael", "sarah", "david", "olivia", "chris", "hannah", "ryan", "megan"],
    "de": ["lukas", "anna", "jonas", "lea", "felix", "marie", "tobias", "sophie", "jan", "katrin"],
    "fr": ["camille", "louis", "chloe", "hugo", "manon", "julien", "ines", "theo", "lea", "nicolas"],
    "es": ["lucia", "pablo", "maria", "javier", "carmen", "diego", "sofia", "alvaro", "elena", "sergio"],
}
LAST = {
    "en": ["smith", "johnson", "walker", "baker", "turner", "hughes", "reed", "price"],
    "de": ["mueller", "schmidt", "weber", "fischer", "becker", "hoffmann", "wagner", "krause"],
    "fr": ["martin", "bernard", "dubois", "moreau", "laurent", "lefebvre", "garnier", "roux"],
    "es": ["garcia", "fernandez", "lopez", "martinez", "sanchez", "romero", "navarro", "torres"],
}
DOMAINS = {
    "en": ["gmail.com", "outlook.com", "acme-corp.com", "northwind.io", "example.co.uk", "stanford.edu"],
    "de": ["gmx.de", "web.de", "t-online.de", "firma-schulz.de", "uni-heidelberg.de", "posteo.de"],
    "fr": ["orange.fr", "free.fr", "laposte.net", "societe-generale.fr", "univ-lyon1.fr", "wanadoo.fr"],
    "es": ["gmail.com", "hotmail.es", "telefonica.es", "uam.es", "empresa-lopez.es", "yahoo.es"],
}


def email(lang):
    f, l, d = R.choice(FIRST[lang]), R.choice(LAST[lang]), R.choice(DOMAINS[lang])
    local = R.choice([f"{f}.{l}", f"{f[0]}{l}", f"{f}_{l}{R.randint(1, 99)}", f"{f}", f"{l}.{f}+{R.choice(['work', 'news', 'billing'])}"])
    return f"{local}@{d}"


def ipv4():
    return R.choice([
        f"10.{R.randint(0, 255)}.{R.randint(0, 255)}.{R.randint(1, 254)}",
        f"192.168.{R.randint(0, 255)}.{R.randint(1, 254)}",
        f"172.{R.randint(16, 31)}.{R.randint(0, 255)}.{R.randint(1, 254)}",
        f"{R.randint(11, 223)}.{R.randint(0, 255)}.{R.randint(0, 255)}.{R.randint(1, 254)}",
    ])


def ipv6():
    h = lambda: f"{R.randint(0, 0xffff):x}"
    return R.choice([
        f"2001:db8:{h()}:{h()}::{h()}", f"fe80::{h()}:{h()}:{h()}:{h()}",
        f"2a02:{h()}:{h()}:{h()}:{h()}:{h()}:{h()}:{h()}", f"fd00::{h()}",
    ])


def version4():
    return R.choice([
        f"{R.randint(1, 12)}.{R.randint(0, 9)}.{R.randint(0, 30)}.{R.randint(0, 250)}",
        f"{R.randint(1, 4)}.{R.randint(0, 20)}.{R.randint(0, 9)}.{R.randint(100, 250)}",
    ])


def alnum(n, chars=string.ascii_letters + string.digits):
    return "".join(R.choice(chars) for _ in range(n))


def aws_id():
    return R.choice(["AKIA", "AKIA", "ASIA"]) + alnum(16, string.ascii_uppercase + "234567")


def aws_secret():
    while True:
        s = alnum(40, string.ascii_letters + string.digits + "/+")
        if any(c.isdigit() for c in s) and any(c.islower() for c in s) and any(c.isupper() for c in s):
            return s


def openai_key():
    return R.choice(["sk-proj-", "sk-", "sk-ant-api03-"]) + alnum(R.choice([32, 48, 64]), string.ascii_letters + string.digits + "_-") + "A1b"


def github_token():
    return R.choice(["ghp_", "gho_", "ghs_"]) + alnum(36)


def slack_token():
    return f"xoxb-{digits(12)}-{digits(13)}-{alnum(24)}"


def b64u(obj):
    return base64.urlsafe_b64encode(json.dumps(obj, separators=(",", ":")).encode()).decode().rstrip("=")


def jwt():
    head = b64u({"alg": R.choice(["HS256", "RS256"]), "typ": "JWT"})
    body = b64u({"sub": digits(8), "name": R.choice(FIRST["en"]).title(), "iat": 1716000000 + R.randint(0, 10**6)})
    return f"{head}.{body}.{alnum(43, string.ascii_letters + string.digits + '_-')}"


def pem():
    kind = R.choice(["RSA PRIVATE KEY", "PRIVATE KEY", "EC PRIVATE KEY", "OPENSSH PRIVATE KEY"])
    lines = [alnum(64, string.ascii_letters + string.digits + "+/") for _ in range(R.randint(3, 6))]
    return f"-----BEGIN {kind}-----\n" + "\n".join(lines) + f"\n-----END {kind}-----"


PASSWORDS = ["hunter2", "Sommer2024!", "Tr0ub4dor&3", "P@ssw0rd123", "Bienvenue2023", "M1Contrasena#", "xK9#mP2qL7",
             "Gr33nTea!", "admin1234", "Qwerty!98", "Winter-2025", "letmein42", "zA8$wq3Lp0", "Rh1n0ceros",
             "S3cure*Pass", "Kaffee!Tasse7", "Soleil_2024", "Playa$2023", "t0pS3cret", "Br3zel+Bier"]


def password():
    if R.random() < 0.5:
        return R.choice(PASSWORDS)
    return alnum(R.randint(10, 18), string.ascii_letters + string.digits) + R.choice(["!", "#", "", "9", "%"])


def uuid():
    h = lambda n: "".join(R.choice("0123456789abcdef") for _ in range(n))
    return f"{h(8)}-{h(4)}-4{h(3)}-{R.choice('89ab')}{h(3)}-{h(12)}"


def sha():
    return "".join(R.choice("0123456789abcdef") for _ in range(R.choice([40, 64])))


def timestamp():
    return f"2024-{R.randint(1, 12):02d}-{R.randint(1, 28):02d}T{R.randint(0, 23):02d}:{R.randint(0, 59):02d}:{R.randint(0, 59):02d}Z"


def order_no():
    return R.choice([f"{digits(3)}-{digits(7)}-{digits(7)}", f"{R.randint(10**9, 10**10 - 1)}", f"A{digits(8)}",
                     f"{digits(4)} {digits(4)} {digits(4)}", f"{digits(2)} {digits(3)} {digits(3)} {digits(2)}"])


def price(lang):
    a = R.randint(1, 9999)
    c = R.randint(0, 99)
    if lang == "en":
        return f"${a:,}.{c:02d}"
    return f"{a:,}".replace(",", ".") + f",{c:02d} €"


# ---------------------------------------------------------------- items

ITEMS = []


class Item:
    def __init__(self, lang, kind, role="user"):
        self.lang, self.kind, self.role = lang, kind, role
        self.find, self.not_ = [], []

    def f(self, det, value):
        self.find.append([det, value])
        return value

    def n(self, value, tempts):
        self.not_.append([value, tempts])
        return value

    def done(self, text):
        ITEMS.append({"lang": self.lang, "kind": self.kind, "role": self.role, "text": text,
                      "find": self.find, "not": self.not_})


def neg_version(it):
    v = version4()
    word = R.choice(["version", "Version", "v", "build", "Build", "versión", "release"])
    sep = "" if word == "v" else " "
    return word + sep + it.n(v, ["ipv4"])


def neg_windows_build(it):
    return it.n(f"10.0.{R.choice([19045, 22621, 22631, 17763])}.{R.randint(100, 4000)}", ["ipv4", "phone"])


def neg_five_part(it):
    return it.n(f"{R.randint(1, 9)}.{R.randint(0, 9)}.{R.randint(0, 9)}.{R.randint(0, 99)}.{R.randint(0, 9)}", ["ipv4"])


def neg_bad_card(it):
    return it.n(card(valid=False), ["credit_card", "phone"])


def neg_bad_iban(it, country=None):
    return it.n(iban(country, valid=False, spaced=True), ["iban", "credit_card", "phone"])


def neg_order(it):
    return it.n(order_no(), ["phone", "credit_card", "us_ssn"])


def neg_uuid(it):
    return it.n(uuid(), ["phone", "ipv6", "password_assignment"])


def neg_hash(it):
    return it.n(sha(), ["aws_secret_key", "openai_key", "password_assignment"])


def neg_ts(it):
    return it.n(timestamp(), ["phone", "ipv6"])


def neg_price(it):
    return it.n(price(it.lang), ["phone", "credit_card"])


# --- chat prompts, per language


def chat_en():
    it = Item("en", "chat")
    k = R.randrange(14)
    if k == 0:
        e = it.f("email", email("en"))
        t = f"Can you draft a polite reply to {e}? She asked whether order {neg_order(it)} shipped yet."
    elif k == 1:
        pw = it.f("password_assignment", password())
        t = f"I'm writing the welcome note for our Airbnb guests. The wifi password is {pw} and checkout is at 11. Make it friendly."
    elif k == 2:
        p = it.f("phone", phone("en"))
        t = f"Rewrite this voicemail script so it sounds less robotic: 'Hi, this is Dana from billing, call me back at {p} about invoice {neg_order(it)}.'"
    elif k == 3:
        c = it.f("credit_card", card())
        t = f"My card {c} was charged twice for {neg_price(it)}. Write a short complaint to the bank."
    elif k == 4:
        ip = it.f("ipv4", ipv4())
        t = f"Why can't I ping {ip} from my laptop? I'm on {R.choice(['Ubuntu 22.04', 'macOS 14.4', 'Windows 11'])}, agent {neg_version(it)}."
    elif k == 5:
        s = it.f("us_ssn", ssn())
        t = f"Fill in this W-9 for me: name Robert Hayes, SSN {s}, address 12 Elm St, Springfield."
    elif k == 6:
        pw = it.f("password_assignment", password())
        t = f"The admin password for the router was {pw}, but after the firmware update to {neg_version(it)} it no longer works. What should I try?"
    elif k == 7:
        t = f"Is {neg_bad_card(it)} a valid test card number? Stripe rejects it."
    elif k == 8:
        i = it.f("iban", iban(R.choice(["GB", "DE", "NL"])))
        t = f"Please wire the deposit to IBAN {i}, reference {neg_order(it)}. How long does SEPA take?"
    elif k == 9:
        t = f"Our tracing shows request {neg_uuid(it)} took 4.2s at {neg_ts(it)}. What could cause that?"
    elif k == 10:
        pw = it.f("password_assignment", password())
        t = f"my password: {pw} — is that strong enough or should I change it?"
    elif k == 11:
        e = it.f("email", email("en"))
        p = it.f("phone", phone("en"))
        t = f"Summarise this contact card for the CRM: Jordan Miles, VP Sales, {e}, mobile {p}."
    elif k == 12:
        t = f"I updated Windows and now `winver` says {neg_windows_build(it)}. Is that the latest build?"
    elif R.random() < 0.15:
        # A plain word after "password is" is not told from "password is
        # expired": a known miss, kept so the score says so.
        pw = it.f("password_assignment", R.choice(["sunflower", "marmalade", "bluebird", "pinecone"]))
        t = f"Guests keep asking, so for the record: the wifi password is {pw} (all lower case)."
    else:
        t = f"The password is expired and the reset link goes to an old address. How do I contact IT? Ticket {neg_order(it)}."
    it.done(t)


def chat_de():
    it = Item("de", "chat")
    k = R.randrange(14)
    if k == 0:
        pw = it.f("password_assignment", password())
        t = f"Schreib bitte eine Nachricht an die Gäste: Das WLAN-Passwort ist {pw}, der Router steht im Flur."
    elif k == 1:
        pw = it.f("password_assignment", password())
        t = f"Mein Passwort lautet {pw}, aber die Anmeldung bei der Sparkasse schlägt fehl. Was kann ich tun?"
    elif k == 2:
        i = it.f("iban", iban("DE"))
        t = f"Formuliere eine Zahlungserinnerung: Betrag {neg_price(it)}, bitte auf IBAN {i} überweisen, Rechnungsnummer {neg_order(it)}."
    elif k == 3:
        e = it.f("email", email("de"))
        t = f"Kannst du eine Absage an {e} schreiben? Der Termin am {R.randint(1, 28)}.{R.randint(1, 12)}.2024 passt leider nicht."
    elif k == 4:
        p = it.f("phone", phone("de"))
        t = f"Bitte kürze diese Signatur: Dr. Katrin Weber, Praxis am Markt, Telefon {p}, Sprechzeiten Mo–Fr."
    elif k == 5:
        t = f"Die Überweisung auf {neg_bad_iban(it, 'DE')} wurde abgelehnt, die Bank sagt, die IBAN sei ungültig. Warum?"
    elif k == 6:
        c = it.f("credit_card", card())
        t = f"Ich habe meine Kreditkarte {c} verloren. Schreib mir eine Sperrmeldung an die Bank."
    elif k == 7:
        ip = it.f("ipv4", ipv4())
        t = f"Mein NAS unter {ip} ist nach dem Update auf {neg_version(it)} nicht mehr erreichbar. Woran liegt das?"
    elif k == 8:
        pw = it.f("password_assignment", password())
        t = f"Das Passwort für den Gastzugang ist {pw}. Formuliere das bitte als Aushang für die Kaffeeküche."
    elif k == 9:
        t = f"Das Passwort ist falsch, sagt der Server seit Version {neg_version(it).split()[-1]}. Hilfe?"
    elif k == 10:
        t = f"Bestellung {neg_order(it)} vom {neg_ts(it)} ist nicht angekommen. Schreib eine Reklamation."
    elif k == 11:
        pw = it.f("password_assignment", password())
        t = f"Kennwort: {pw} – reicht das für das Firmenkonto oder ist das zu schwach?"
    elif k == 12:
        e = it.f("email", email("de"))
        i = it.f("iban", iban(R.choice(["DE", "AT"])))
        t = f"Neuer Lieferant: Mail {e}, Bankverbindung {i}. Leg bitte einen Stammdatensatz an."
    else:
        t = f"Ist {neg_bad_card(it)} eine gültige Kartennummer? Der Shop lehnt sie ab."
    it.done(t)


def chat_fr():
    it = Item("fr", "chat")
    k = R.randrange(13)
    if k == 0:
        pw = it.f("password_assignment", password())
        t = f"Peux-tu rédiger un mot pour les invités ? Le mot de passe du wifi est {pw}, la box est dans le salon."
    elif k == 1:
        pw = it.f("password_assignment", password())
        t = f"Mon mot de passe est {pw} mais l'espace client refuse la connexion depuis hier. Que faire ?"
    elif k == 2:
        p = it.f("phone", phone("fr"))
        t = f"Reformule ce message : « Bonjour, rappelez-moi au {p} au sujet du devis {neg_order(it)}. »"
    elif k == 3:
        i = it.f("iban", iban("FR"))
        t = f"Rédige un courrier à mon propriétaire pour changer le prélèvement vers l'IBAN {i}."
    elif k == 4:
        e = it.f("email", email("fr"))
        t = f"Écris une relance à {e} pour la facture de {neg_price(it)}, merci."
    elif k == 5:
        c = it.f("credit_card", card())
        t = f"J'ai payé avec la carte {c} et le montant de {neg_price(it)} a été débité deux fois."
    elif k == 6:
        t = f"Le mot de passe est incorrect d'après le serveur depuis la mise à jour {neg_version(it)}. Une idée ?"
    elif k == 7:
        t = f"La banque refuse l'IBAN {neg_bad_iban(it, 'FR')}, elle dit que la clé est fausse. Pourquoi ?"
    elif k == 8:
        ip = it.f("ipv4", ipv4())
        t = f"Comment ouvrir le port 443 sur ma box pour le serveur {ip} ?"
    elif k == 9:
        pw = it.f("password_assignment", password())
        t = f"mdp : {pw} — c'est assez solide pour un compte bancaire ?"
    elif k == 10:
        t = f"Ma commande {neg_order(it)} du {neg_ts(it)} n'est toujours pas livrée."
    elif k == 11:
        pw = it.f("password_assignment", password())
        t = f"Le code wifi c'est pas compliqué, le mot de passe c'est {pw}. Fais-en une affichette."
    else:
        p = it.f("phone", phone("fr"))
        e = it.f("email", email("fr"))
        t = f"Ajoute ce contact : Camille Roux, {p}, {e}, cabinet d'architecture à Lyon."
    it.done(t)


def chat_es():
    it = Item("es", "chat")
    k = R.randrange(13)
    if k == 0:
        pw = it.f("password_assignment", password())
        t = f"¿Puedes escribir una nota para los huéspedes? La contraseña del wifi es {pw} y el check-out es a las 12."
    elif k == 1:
        pw = it.f("password_assignment", password())
        t = f"Mi contraseña es {pw} pero el banco dice que es incorrecta. ¿Qué hago?"
    elif k == 2:
        i = it.f("iban", iban("ES"))
        t = f"Redacta un correo para pedir que me paguen en la cuenta {i}, concepto factura {neg_order(it)}."
    elif k == 3:
        p = it.f("phone", phone("es"))
        t = f"Mejora este mensaje: «Hola, soy Lucía de recursos humanos, llámame al {p} cuando puedas.»"
    elif k == 4:
        e = it.f("email", email("es"))
        t = f"Escribe una respuesta a {e} confirmando la reunión del jueves."
    elif k == 5:
        c = it.f("credit_card", card())
        t = f"Me cobraron {neg_price(it)} dos veces en la tarjeta {c}. Redacta una reclamación."
    elif k == 6:
        t = f"La contraseña es incorrecta desde que actualicé a la {neg_version(it)}. ¿Alguna idea?"
    elif k == 7:
        t = f"El banco rechaza la cuenta {neg_bad_iban(it, 'ES')} porque los dígitos de control no cuadran."
    elif k == 8:
        ip = it.f("ipv4", ipv4())
        t = f"¿Cómo configuro una IP fija {ip} en mi impresora?"
    elif k == 9:
        pw = it.f("password_assignment", password())
        t = f"clave: {pw} — ¿es segura para la cuenta de la empresa?"
    elif k == 10:
        t = f"El pedido {neg_order(it)} del {neg_ts(it)} llegó roto. Escribe una queja."
    elif k == 11:
        pw = it.f("password_assignment", password())
        t = f"La contraseña de la alarma es {pw}, apúntala en el manual de la casa rural por favor."
    else:
        t = f"¿La tarjeta {neg_bad_card(it)} es válida? La tienda online la rechaza."
    it.done(t)


# --- e-mails


def email_item():
    lang = R.choice(["en", "de", "fr", "es"])
    it = Item(lang, "email")
    e1 = it.f("email", email(lang))
    e2 = it.f("email", email(lang))
    p = it.f("phone", phone(lang))
    greet, body, sig = {
        "en": ("Hi team,", f"Please find the signed contract attached. Invoice {neg_order(it)} totals {neg_price(it)}.", "Best regards"),
        "de": ("Hallo zusammen,", f"anbei der unterschriebene Vertrag. Rechnung {neg_order(it)} über {neg_price(it)}.", "Viele Grüße"),
        "fr": ("Bonjour à tous,", f"vous trouverez ci-joint le contrat signé. Facture {neg_order(it)} d'un montant de {neg_price(it)}.", "Cordialement"),
        "es": ("Hola a todos,", f"adjunto el contrato firmado. Factura {neg_order(it)} por {neg_price(it)}.", "Un saludo"),
    }[lang]
    extra = ""
    r = R.random()
    if r < 0.3:
        i = it.f("iban", iban({"en": "GB", "de": "DE", "fr": "FR", "es": "ES"}[lang]))
        extra = {"en": f"Bank details: {i}", "de": f"Bankverbindung: {i}", "fr": f"Coordonnées bancaires : {i}", "es": f"Datos bancarios: {i}"}[lang]
    elif r < 0.5:
        pw = it.f("password_assignment", password())
        extra = {"en": f"The password for the shared folder is {pw}", "de": f"Das Passwort für den Ordner ist {pw}",
                 "fr": f"Le mot de passe du dossier partagé est {pw}", "es": f"La contraseña de la carpeta es {pw}"}[lang]
    t = (f"Can you summarise this thread?\n\nFrom: {e1}\nTo: {e2}\nDate: {neg_ts(it)}\n\n{greet}\n{body}\n{extra}\n\n"
         f"{sig}\nTel. {p}")
    it.done(t)


# --- code


def code_item():
    it = Item(R.choice(["en", "de", "fr", "es"]), "code")
    k = R.randrange(16)
    pw = password()
    if k == 0:
        it.f("password_assignment", pw)
        t = f"Why does this fail?\n\n```python\nDB = {{\n    'host': 'db.internal',\n    'user': 'app',\n    'pwd': '{pw}',\n    'port': 5432,\n}}\nconn = psycopg2.connect(**DB)\n```"
    elif k == 1:
        it.f("password_assignment", pw)
        t = f"```json\n{{\"username\": \"svc-backup\", \"pass\": \"{pw}\", \"retries\": 3, \"request_id\": \"{neg_uuid(it)}\"}}\n```\nThe API returns 401, what's wrong?"
    elif k == 2:
        it.f("password_assignment", pw)
        t = f"```yaml\nsmtp:\n  host: mail.example.org\n  port: 587\n  user: noreply\n  passwd: {pw}\n  starttls: true\n```\nConvert this to TOML."
    elif k == 3:
        it.f("password_assignment", pw)
        t = f"My .env:\n```\nAPP_ENV=production\nDB_HOST=10.0.3.12\nDB_PASS={pw}\nLOG_LEVEL=info\n```\nwhy is DB_HOST not picked up?"
        it.f("ipv4", "10.0.3.12")
    elif k == 4:
        sec = aws_secret()
        kid = it.f("aws_access_key", aws_id())
        it.f("aws_secret_key", sec)
        t = f"I exported these from the IAM console, how do I use them with boto3?\n\nAccess key ID,Secret access key\n{kid},{sec}"
    elif k == 5:
        sec = aws_secret()
        kid = it.f("aws_access_key", aws_id())
        it.f("aws_secret_key", sec)
        t = f"```\n$ aws configure\nAWS Access Key ID [None]: {kid}\nAWS Secret Access Key [None]: {sec}\nDefault region name [None]: eu-central-1\n```\nit still says InvalidClientTokenId"
    elif k == 6:
        sec = aws_secret()
        kid = it.f("aws_access_key", aws_id())
        it.f("aws_secret_key", sec)
        t = f"s3 = boto3.client('s3', '{kid}', '{sec}')  # why does this ignore the region?"
    elif k == 7:
        it.f("password_assignment", pw)
        t = f"```sh\ndocker run -d -e POSTGRES_PASSWORD={pw} -p 5432:5432 postgres:16.2\n```\nThe container exits immediately."
    elif k == 8:
        key = it.f("openai_key", openai_key())
        it.f("password_assignment", key)
        t = f"```python\nclient = OpenAI(api_key=\"{key}\")\nresp = client.chat.completions.create(model=\"gpt-4o\", messages=msgs)\n```\nGetting a 429."
    elif k == 9:
        tok = it.f("github_token", github_token())
        t = f"git clone https://{tok}@github.com/acme/infra.git fails with 403 — does the token need repo scope?"
    elif k == 10 and R.random() < 0.5:
        logo = it.n(R.choice(["logo@2x.png", "icon@3x.png", "hero@2x.jpg", "avatar@2x.webp"]), ["email"])
        pkg = it.n(f"@types/node@{R.randint(16, 22)}.{R.randint(0, 20)}.{R.randint(0, 9)}", ["email"])
        t = (f"Vite can't resolve `./assets/{logo}` after upgrading `{pkg}`, "
             f"and `@Component` decorators fail in {neg_hash(it)[:12]}.")
    elif k == 10:
        t = (f"```python\nCACHE_KEY = '{neg_hash(it)}'\nBUILD = '{neg_windows_build(it)}'\nTRACE = '{neg_uuid(it)}'\n```"
             f"\nRefactor into a dataclass.")
    elif k == 11:
        it.f("password_assignment", pw)
        t = f"```js\nconst cfg = {{ user: 'admin', secret: '{pw}', endpoint: 'https://api.internal' }};\n```\nHow do I load this from env vars instead?"
    elif k == 12:
        j = it.f("jwt", jwt())
        t = f"curl -H 'Authorization: Bearer {j}' https://api.example.com/v2/me returns 401, is the token expired?"
    elif k == 13:
        key = it.f("pem_private_key", pem())
        t = f"Is this key in the right format for paramiko?\n\n{key}\n"
    elif k == 14:
        st = it.f("slack_token", slack_token())
        t = f"```python\nclient = WebClient(token=\"{st}\")\nclient.chat_postMessage(channel='#ops', text='deploy done')\n```"
    else:
        it.f("password_assignment", pw)
        t = f"```php\n$config = ['db_user' => 'shop', 'db_pass' => '{pw}', 'version' => '{neg_version(it).split()[-1]}'];\n```"
    it.done(t)


# --- logs


def log_item():
    it = Item("en", "log")
    lines = []
    for _ in range(R.randint(3, 6)):
        k = R.randrange(9)
        ts = neg_ts(it)
        if k == 0:
            lines.append(f"{ts} INFO  http: GET /api/orders/{neg_order(it)} 200 from {it.f('ipv4', ipv4())} in 12ms")
        elif k == 1:
            lines.append(f"{ts} WARN  auth: failed login for {it.f('email', email(R.choice(['en', 'de'])))} from {it.f('ipv4', ipv4())}")
        elif k == 2:
            lines.append(f"{ts} INFO  agent {neg_version(it)} started, trace_id={neg_uuid(it)}")
        elif k == 3:
            lines.append(f"{ts} DEBUG cache hit key={neg_hash(it)}")
        elif k == 4:
            lines.append(f"{ts} INFO  client connected from [{it.f('ipv6', ipv6())}]:51234")
        elif k == 5:
            lines.append(f"{ts} ERROR payment declined card={neg_bad_card(it)} amount={neg_price(it)}")
        elif k == 6:
            lines.append(f"{ts} INFO  os=Windows {neg_windows_build(it)} chrome=124.0.6367.91")
        elif k == 7:
            lines.append(f"{ts} DEBUG db connect password={it.f('password_assignment', password())} host=db-1")
        else:
            lines.append(f"{ts} INFO  upgrade plan {neg_five_part(it)} -> next")
    t = "What went wrong here?\n\n" + "\n".join(lines)
    it.done(t)


# --- configs


def config_item():
    it = Item("en", "config")
    k = R.randrange(6)
    if k == 0:
        pw = it.f("password_assignment", password())
        ip = it.f("ipv4", ipv4())
        t = f"[database]\nhost = \"{ip}\"\nport = 5432\nuser = \"app\"\npassword = \"{pw}\"\npool = 10\n\nWhy does the pool exhaust?"
    elif k == 1:
        sec = aws_secret()
        kid = it.f("aws_access_key", aws_id())
        it.f("password_assignment", sec)
        it.f("aws_secret_key", sec)
        t = f"~/.aws/credentials:\n[default]\naws_access_key_id = {kid}\naws_secret_access_key = {sec}\n\nregion is missing?"
    elif k == 2:
        pw = it.f("password_assignment", password())
        t = f"```yaml\napiVersion: v1\nkind: Secret\nstringData:\n  pwd: \"{pw}\"\n  image: registry/app:{neg_version(it).split()[-1]}\n```"
    elif k == 3:
        t = f"server {{\n  listen 443 ssl;\n  # build {neg_version(it).split()[-1]}\n  proxy_pass http://upstream;\n}}"
    elif k == 4:
        pw = it.f("password_assignment", password())
        t = f"spring.datasource.url=jdbc:mysql://db:3306/shop\nspring.datasource.username=shop\nspring.datasource.password={pw}\nmanagement.server.port=9090"
    else:
        i = it.f("ipv6", ipv6())
        t = f"interface eth0\n  address {i}/64\n  mtu 1500\n# firmware {neg_version(it).split()[-1]}"
    it.done(t)


# --- answers (assistant turns)


def answer_item():
    lang = R.choice(["en", "de", "fr", "es"])
    it = Item(lang, "answer", "assistant")
    k = R.randrange(5)
    if k == 0:
        e = it.f("email", email(lang))
        t = {"en": f"Sure! Here's the reply:\n\nDear team, please send the signed form to {e} by Friday.",
             "de": f"Gern! Hier der Entwurf:\n\nBitte schicken Sie das Formular bis Freitag an {e}.",
             "fr": f"Voici une proposition :\n\nMerci d'envoyer le formulaire signé à {e} avant vendredi.",
             "es": f"¡Claro! Aquí tienes:\n\nPor favor, envía el formulario firmado a {e} antes del viernes."}[lang]
    elif k == 1:
        pw = it.f("password_assignment", password())
        t = {"en": f"Welcome! The wifi password is {pw}. Enjoy your stay.",
             "de": f"Willkommen! Das WLAN-Passwort lautet {pw}. Schönen Aufenthalt!",
             "fr": f"Bienvenue ! Le mot de passe du wifi est {pw}. Bon séjour !",
             "es": f"¡Bienvenidos! La contraseña del wifi es {pw}. ¡Disfrutad!"}[lang]
    elif k == 2:
        t = {"en": f"Build {neg_version(it).split()[-1]} is the current release; version {version4()} is older.",
             "de": f"Aktuell ist Version {neg_version(it).split()[-1]}.",
             "fr": f"La version actuelle est la {neg_version(it).split()[-1]}.",
             "es": f"La versión actual es la {neg_version(it).split()[-1]}."}[lang]
    elif k == 3:
        p = it.f("phone", phone(lang))
        t = {"en": f"You can reach support at {p} (Mon–Fri).",
             "de": f"Den Support erreichen Sie unter {p} (Mo–Fr).",
             "fr": f"Le support est joignable au {p} (lun.–ven.).",
             "es": f"Puedes llamar a soporte al {p} (lun–vie)."}[lang]
    else:
        t = {"en": f"That card number ({neg_bad_card(it)}) fails the Luhn check, so it's a typo.",
             "de": f"Die IBAN {neg_bad_iban(it)} hat falsche Prüfziffern.",
             "fr": f"L'IBAN {neg_bad_iban(it)} a une clé de contrôle invalide.",
             "es": f"El IBAN {neg_bad_iban(it)} tiene dígitos de control incorrectos."}[lang]
    it.done(t)


def main():
    makers = [(chat_en, 170), (chat_de, 150), (chat_fr, 130), (chat_es, 130), (email_item, 120),
              (code_item, 220), (log_item, 80), (config_item, 90), (answer_item, 100)]
    for make, n in makers:
        for _ in range(n):
            make()
    files = {}
    for i, item in enumerate(ITEMS):
        name = item["kind"] if item["kind"] in ("code", "log", "config") else item["lang"]
        item = {"id": f"{name}-{i:04d}", **item}
        files.setdefault(name, []).append(item)
    for name, items in files.items():
        with open(f"{name}.jsonl", "w", encoding="utf-8") as out:
            for item in items:
                out.write(json.dumps(item, ensure_ascii=False) + "\n")
    print(sum(len(v) for v in files.values()), "items in", len(files), "files")


if __name__ == "__main__":
    main()
